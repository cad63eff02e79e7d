"""Resolve what the user asked to build into a local, checked Hugging Face checkpoint folder."""

from __future__ import annotations

import json
import math
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .errors import SourceError

# What a conversion needs from a repo: weights as safetensors, configs, tokenizer, chat template.
ALLOW_PATTERNS = [
    "*.safetensors", "*.safetensors.index.json", "config.json", "generation_config.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.json", "chat_template.jinja",
    "*.tiktoken", "README.md", "LICENSE*",
]
PICKLE_PATTERNS = ["*.bin", "*.pt", "*.pth", "*.ckpt"]
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class Source:
    path: Path  # local folder with config.json and weights
    name: str  # model name used in file names: "SmolLM2-135M-Instruct"
    repo_id: str | None = None  # set when downloaded from the Hub
    revision: str | None = None  # the resolved commit sha of a Hub download
    architecture: str = ""
    dtype: str = "float16"
    license: str | None = None
    base_model: str | None = None  # what the checkpoint's own card says it derives from
    chat_template: str | None = None
    config: dict = field(default_factory=dict, compare=False, repr=False)

    def describe(self) -> str:
        if self.repo_id:
            return f"{self.repo_id}@{(self.revision or '')[:12]}"
        return str(self.path)


def resolve(spec: str, *, revision: str | None = None, allow_pickle: bool = False,
            trust_remote_code: bool = False, name: str | None = None) -> Source:
    """`spec` is a local folder or a Hub repo id ("ORG/MODEL")."""
    local = Path(spec).expanduser()
    if local.exists():
        if not local.is_dir():
            raise SourceError(f"{spec} is a file, not a checkpoint folder", "pass the folder that holds config.json")
        return inspect(local, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code, name=name)
    if not _REPO_ID.match(spec):
        raise SourceError(f"{spec!r} is neither an existing folder nor a Hub repo id", "use ORG/MODEL or a path to a folder")
    folder, commit = download(spec, revision=revision, allow_pickle=allow_pickle)
    src = inspect(folder, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code,
                  name=name or spec.split("/")[-1])
    return Source(**{**src.__dict__, "repo_id": spec, "revision": commit})


def download(repo_id: str, *, revision: str | None = None, allow_pickle: bool = False) -> tuple[Path, str]:
    """snapshot_download the files a conversion needs; HF_ENDPOINT and HF_TOKEN apply as usual."""
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError,
    )

    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    try:
        # Pin the commit first, so the files and the report's revision are the same snapshot.
        commit = HfApi().model_info(repo_id, revision=revision).sha
        patterns = ALLOW_PATTERNS + (PICKLE_PATTERNS if allow_pickle else [])
        # The Hugging Face cache (HF_HUB_CACHE), shared with every other tool that downloads models.
        folder = snapshot_download(repo_id, revision=commit, allow_patterns=patterns)
    except GatedRepoError as e:
        raise SourceError(f"{repo_id} is gated on {endpoint}", "accept its terms on the Hub, then set HF_TOKEN") from e
    except RepositoryNotFoundError as e:
        raise SourceError(
            f"repo {repo_id} not found on {endpoint}",
            "check the name; for a private repo set HF_TOKEN to a token that can read it",
        ) from e
    except RevisionNotFoundError as e:
        raise SourceError(f"revision {revision!r} not found in {repo_id}", "pass an existing branch, tag or commit") from e
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as e:
        raise SourceError(
            f"cannot download {repo_id} from {endpoint}: {str(e).splitlines()[0]}",
            "check the network and HF_ENDPOINT, or build from a local folder",
        ) from e
    return Path(folder), commit


# Any of these makes a tokenizer transformers and llama.cpp's converter can load.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tiktoken.model")


def inspect(folder: Path, *, allow_pickle: bool = False, trust_remote_code: bool = False,
            name: str | None = None) -> Source:
    folder = folder.resolve()
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise SourceError(f"{folder} has no config.json", "pass the folder of a Hugging Face checkpoint (config.json + weights)")
    try:
        config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise SourceError(f"{cfg_path} is not valid JSON ({e.msg}, line {e.lineno})", "fix or re-download config.json") from e
    safetensors = list(folder.glob("*.safetensors"))
    pickles = [p for pat in PICKLE_PATTERNS for p in folder.glob(pat)]
    if not safetensors:
        if pickles and not allow_pickle:
            raise SourceError(
                f"{folder} has only pickle weights ({pickles[0].name}); loading them can run arbitrary code",
                "convert them to safetensors, or pass --allow-pickle if you trust this checkpoint",
            )
        if not pickles:
            raise SourceError(f"{folder} has no weights (*.safetensors)", "download the weights too")
    if config.get("auto_map") and not trust_remote_code:
        raise SourceError(
            f"{folder.name} needs custom code from its repo (auto_map in config.json)",
            "read that code, then pass --trust-remote-code to allow it",
        )
    archs = config.get("architectures") or []
    if not archs:
        raise SourceError(f"{cfg_path} names no architecture", "add \"architectures\" to config.json")
    for f in sorted(safetensors):
        check_safetensors(f)
    if not any((folder / n).is_file() for n in TOKENIZER_FILES):
        raise SourceError(f"{folder.name} has no tokenizer ({' or '.join(TOKENIZER_FILES[:2])})",
                          "download the tokenizer files of the model too")
    return Source(
        path=folder,
        name=name or _model_name(folder),
        architecture=archs[0],
        dtype=str(config.get("torch_dtype") or config.get("dtype") or "float16"),
        license=_card_field(folder, "license"),
        base_model=_card_field(folder, "base_model"),
        chat_template=_chat_template(folder),
        config=config,
    )


def _model_name(folder: Path) -> str:
    # Hub cache folders are models--ORG--NAME/snapshots/<commit>; the repo name is further up.
    name = folder.name
    if re.fullmatch(r"[0-9a-f]{40}", name) and folder.parent.name == "snapshots":
        name = folder.parent.parent.name.split("--")[-1]
    return name


def _card_field(folder: Path, key: str) -> str | None:
    """A string field of the model card's YAML header (the first entry, if it is a list)."""
    readme = folder / "README.md"
    if not readme.is_file():
        return None
    m = re.search(r"^---\n(.*?)\n---", readme.read_text(errors="replace"), re.S)
    if not m:
        return None
    try:
        value = yaml.safe_load(m.group(1) or "").get(key)
    except (yaml.YAMLError, AttributeError):
        return None
    if isinstance(value, list):
        value = value[0] if value else None
    return str(value) if value else None


def _chat_template(folder: Path) -> str | None:
    """The default chat template: chat_template.jinja (newer layout) or tokenizer_config.json's field."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    cfg = folder / "tokenizer_config.json"
    if cfg.is_file():
        try:
            value = json.loads(cfg.read_text()).get("chat_template")
        except json.JSONDecodeError:
            return None
        if isinstance(value, list):  # named templates: [{"name": "default", "template": ...}, ...]
            value = next((t["template"] for t in value if t.get("name") == "default"), None)
        return value
    return None


def safetensors_header(path: Path) -> dict:
    """The JSON header of a .safetensors file: names, dtypes and shapes, without reading any weights."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return json.loads(f.read(n))


def check_safetensors(path: Path) -> None:
    """A readable header, and a file long enough for every tensor it lists (downloads get cut short)."""
    size = path.stat().st_size
    try:
        if size < 8:
            raise ValueError("shorter than the 8-byte header length")
        with open(path, "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            if n > min(size - 8, 100_000_000):
                raise ValueError(f"header length {n} does not fit the file")
            header = json.loads(f.read(n))
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError, IndexError) as e:  # JSONDecodeError is a ValueError
        raise SourceError(f"{path.name} has a corrupt safetensors header ({str(e).splitlines()[0][:120]})",
                          "re-download the file") from e
    if size < 8 + n + end:
        raise SourceError(f"{path.name} is truncated: {size} bytes, its header needs {8 + n + end}",
                          "re-download the file (the download was cut short)")


@dataclass(frozen=True)
class TensorStats:
    """What the safetensors headers say of a checkpoint's size, without reading any weights."""

    params: int
    weight_bytes: int
    largest: int  # values of the largest tensor
    largest_module: int  # values one module holds: the largest tensor, or all experts of one MoE layer
    expert_bytes: int = 0  # bytes of MoE expert weights (transformers copies them into fused tensors on load)
    linear: int = 0  # values of the 2-D weights inside the decoder blocks: what GPTQ, AWQ and EXL2 quantize
    embedding: int = 0  # values of the input embedding
    head: int = 0  # values of an untied output head (0 when tied to the embedding)


def tensor_stats(folder: Path) -> TensorStats:
    params = weight_bytes = largest = experts = linear = embedding = head = 0
    modules: dict[str, int] = {}
    for f in sorted(folder.glob("*.safetensors")):
        for name, t in safetensors_header(f).items():
            if name == "__metadata__":
                continue
            n = math.prod(t["shape"])
            params += n
            weight_bytes += t["data_offsets"][1] - t["data_offsets"][0]
            largest = max(largest, n)
            # transformers runs a MoE layer's experts as one module (fused weights): count them together.
            group = re.sub(r"\.experts\.\d+\..*", ".experts", name)
            modules[group] = modules.get(group, 0) + n
            if group != name:
                experts += t["data_offsets"][1] - t["data_offsets"][0]
            if ".layers." in name and name.endswith(".weight") and len(t["shape"]) == 2:
                linear += n
            embedding += n if name == "model.embed_tokens.weight" else 0
            head += n if name == "lm_head.weight" else 0
    if params == 0:
        raise SourceError(f"no tensors found in {folder}/*.safetensors", "check the download")
    return TensorStats(params, weight_bytes, largest, max(modules.values()), experts, linear, embedding, head)


def param_count(folder: Path) -> int:
    return tensor_stats(folder).params
