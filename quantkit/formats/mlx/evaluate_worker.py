"""Child process: evaluate an MLX folder on its exact weights.

  evaluate:  python -m quantkit.formats.mlx.evaluate_worker evaluate FOLDER SPEC.json OUT.json

MLX's CPU backend is far too slow on x86 to score text (measured on the sample's 4-bit folder, 2 cores:
6.5 s a token, about 55 minutes a 512-token window; 70 s a window with the layers dequantized), so:

1. mlx-lm loads the folder and dequantizes every layer with MLX's own `mx.dequantize` (mlx-lm's
   dequantize_model): the exact values its quantized matmuls compute with, written as a 16-bit checkpoint
   under the folder's own tensor names (which are the source architecture's for the models mlx-lm keeps as
   transformers names them).
2. The perplexity, KL-divergence and top-1 come from that checkpoint through the reference's runner
   (transformers, computed in float32), on the same token ids; so do the tool-call and JSON-mode replies.
3. mlx-lm itself runs the folder as its users do: the smoke test with mlx-lm's generate, and a runtime check
   that mlx-lm's model code, reading the folder's config.json, gives the same next-token distributions as
   transformers on the same weights. A runtime that misreads the model (transformers 5's rope_parameters read
   as the default RoPE base) fails here instead of being published.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

from ...evaluate import hf_worker
from ...evaluate.chat import chat_turns
from ...evaluate.metrics import log_softmax, worker_main

# Positions of the first window both runtimes score for the runtime check, and the bound it must meet.
RUNTIME_CHECK_TOKENS = 64
RUNTIME_MAX_KLD = 0.01
_TOKENIZER_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                    "special_tokens_map.json", "tokenizer.model")


def _dequantized(folder: str):
    """The folder as mlx-lm loads it, every layer dequantized by MLX (mlx-lm's dequantize_model)."""
    from mlx_lm import load
    from mlx_lm.utils import dequantize_model

    model, tok = load(folder)
    return dequantize_model(model), tok


def _runnable_here(model) -> None:
    """MLX's CPU backend runs a MoE's stacked experts (gather_mm) in float32 only ("[GatherMM::eval] Currently only
    supports float32"): there, widen the dequantized model to float32, which is exact, and computes as the
    reference does. Metal runs them as stored."""
    import mlx.core as mx
    from mlx_lm.models.switch_layers import SwitchLinear

    if mx.default_device() == mx.cpu and any(isinstance(m, SwitchLinear) for _, m in model.named_modules()):
        model.set_dtype(mx.float32)


def _first_tokens(spec: dict) -> np.ndarray:
    ids = np.load(spec["tokens"])[:RUNTIME_CHECK_TOKENS].astype(np.int32)
    if spec.get("bos") is not None:
        ids[0] = spec["bos"]
    return ids


# mlx-lm stacks a MoE layer's experts into one [experts, out, in] tensor per projection, under `switch_mlp`
# (its models' `sanitize` does the stacking); transformers reads one tensor per expert under the source's names.
# The source's name of each projection, by model type, where it is not mlx-lm's own.
_EXPERT_PROJECTIONS = {"mixtral": {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}}
_STACKED = re.compile(r"(?P<block>.*)\.switch_mlp\.(?P<proj>\w+)\.weight")


def source_names(weights: dict, model_type: str) -> dict:
    """mlx-lm's flat parameters under the source checkpoint's names: stacked experts split back into one tensor
    each. A projection of a model type not listed keeps mlx-lm's name (the source's, for most MoE families); a
    wrong name is refused by the load that follows, naming it."""
    projections = _EXPERT_PROJECTIONS.get(model_type, {})
    named = {}
    for key, value in weights.items():
        m = _STACKED.fullmatch(key)
        if m is None:
            named[key] = value
            continue
        for e in range(value.shape[0]):
            named[f"{m['block']}.experts.{e}.{projections.get(m['proj'], m['proj'])}.weight"] = value[e]
    return named


def write_checkpoint(folder: str, spec: dict, out: Path) -> np.ndarray:
    """In MLX: the 16-bit checkpoint of the exact weights into `out`, under the source's tensor names, and
    mlx-lm's log-probabilities of the runtime check's tokens."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    model, _ = _dequantized(folder)
    config = json.loads((Path(folder) / "config.json").read_text())
    weights = source_names(dict(tree_flatten(model.parameters())), str(config.get("model_type") or ""))
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "pt"})
    _runnable_here(model)
    for key in ("quantization", "quantization_config"):
        config.pop(key, None)
    (out / "config.json").write_text(json.dumps(config))
    for name in _TOKENIZER_FILES:
        if (Path(folder) / name).is_file():
            shutil.copy(Path(folder) / name, out / name)
    return log_softmax(np.array(model(mx.array(_first_tokens(spec))[None])[0].astype(mx.float32)))


def mlx_smoke(folder: str, spec: dict) -> dict | None:
    """The smoke test as mlx-lm users run the folder: mlx-lm's generate, greedy, stopping at its EOS ids (on the
    dequantized layers: the same weights, at a usable speed on CPU)."""
    from mlx_lm import stream_generate

    model, tok = _dequantized(folder)
    _runnable_here(model)
    hf = tok._tokenizer  # the transformers tokenizer mlx-lm wraps

    def generate(prompt: str, max_tokens: int, special: bool = True) -> tuple[str, str | None]:
        new, end = [], None
        for r in stream_generate(model, tok, hf(prompt, add_special_tokens=False)["input_ids"], max_tokens=max_tokens):
            if r.token in tok.eos_token_ids:
                end = hf.convert_ids_to_tokens(r.token)
                break
            new.append(r.token)
        return hf.decode(new, skip_special_tokens=not special), end

    return chat_turns(generate, hf_worker.template_render(hf), {**spec, "probes": None},
                      "the folder has no chat template").get("smoke")


def runtime_check(folder: Path, runtime_logprobs: np.ndarray, spec: dict) -> tuple[float, float]:
    """KL(transformers || mlx-lm) and top-1 agreement over the first tokens, on the same weights."""
    import torch

    model, _, _ = hf_worker.load_model(str(folder), {"reference": True})
    with torch.inference_mode():
        ref = log_softmax(model(torch.from_numpy(_first_tokens(spec).astype(np.int64))[None]).logits[0].float().numpy())
    kld = float(np.mean(np.sum(np.exp(ref) * (ref - runtime_logprobs), axis=-1)))
    top1 = float(np.mean(ref.argmax(-1) == runtime_logprobs.argmax(-1)))
    return kld, top1


def evaluate(folder: str, spec: dict) -> dict:
    with tempfile.TemporaryDirectory(prefix="mlx-dequantized-", dir=Path(spec["tokens"]).parent) as tmp:
        out = Path(tmp)
        kld, top1 = runtime_check(out, write_checkpoint(folder, spec, out), spec)
        if kld > RUNTIME_MAX_KLD:
            sys.exit(f"error: mlx-lm does not reproduce its own folder's weights as transformers runs them (KLD {kld:.4f} "
                     f"> {RUNTIME_MAX_KLD}, top-1 {top1:.1%} over {RUNTIME_CHECK_TOKENS} tokens): it misreads the "
                     "model's config.json, so the folder would run wrong in mlx-lm")
        # transformers scores and writes the probes' replies; the smoke test is mlx-lm's own (below).
        result = hf_worker.evaluate(str(out), {**spec, "reference": True, "smoke": None})
    if spec.get("chat") is not False and (smoke := mlx_smoke(folder, spec)):
        result["smoke"] = smoke
    result["note"] = (f"exact weights (dequantized by MLX) scored through transformers; smoke test with mlx-lm's "
                      f"generate; mlx-lm vs transformers on the same weights: KLD {kld:.5f}, top-1 {top1:.0%} "
                      f"over {RUNTIME_CHECK_TOKENS} tokens")
    return result


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:], {"evaluate": evaluate}))
