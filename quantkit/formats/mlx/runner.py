"""Child process: evaluate an MLX folder on its exact weights.

  evaluate:  python -m quantkit.formats.mlx.runner evaluate FOLDER SPEC.json OUT.json

MLX's CPU backend is far too slow on x86 to score text in 16 bits (measured on the sample's 4-bit folder, 2
cores: 6.5 s a token, about 55 minutes a 512-token window), so:

1. MLX dequantizes every layer with its own `mx.dequantize` (mlx-lm's dequantize_model, applied to the folder
   loaded lazily): the exact values its quantized matmuls compute with, written as a 16-bit checkpoint under
   the source architecture's tensor names, a decoder layer a shard. Nothing is computed until its shard is
   written, a tensor at a time, and a written shard's arrays are dropped, so one layer is dequantized in memory
   at a time, not the model (93 GB for Mixtral-8x7B).
2. The perplexity, KL-divergence and top-1 come from that checkpoint through the reference's runner
   (transformers, computed in float32), on the same token ids; so do the tool-call and JSON-mode replies.
3. mlx-lm itself runs the folder as its users do, quantized (its quantized matmuls, with the scales and
   activations in float32: MLX's CPU backend computes float16 slowly and gathers a MoE's experts in float32
   only; the packed weights stay as they are, so this takes about the folder's size): the smoke test with
   mlx-lm's generate, and a runtime check that mlx-lm's model code, reading the folder's config.json, gives the
   same next-token distributions as transformers on the same weights (evaluate/parity.py: the bounds and the
   formula of every runtime's parity). A runtime that misreads the model (transformers 5's rope_parameters read
   as the default RoPE base) fails here instead of being published.

The checkpoint and the runtime check are made once per evaluation: with a precision target the evaluation runs in
rounds, and they are kept in the spec's scratch folder (with the mlx and mlx-lm versions that made them) until
quantkit removes it after the last round. Each phase runs once: mlx-lm (the runtime check, and the smoke test in
the first round), then transformers (the check's other side, the scoring, the probes in the first round).
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np

from ...evaluate import causality, hf_runner
from ...evaluate.chat import chat_turns
from ...evaluate.metrics import log_softmax
from ...evaluate.parity import Parity
from ...evaluate.protocol import EvalOutput, EvalSpec, run, runner_main
from ...fsutil import atomic_dir
from ..base import versions

# Positions of the first window both runtimes score for the runtime check (its bounds: evaluate/parity.py).
RUNTIME_CHECK_TOKENS = 64
_TOKENIZER_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                    "special_tokens_map.json", "tokenizer.model")


def _runtime(folder: str):
    """(model, tokenizer): the folder as mlx-lm loads it, quantized, with its floating-point parameters (scales,
    biases, norms) and so its activations in float32."""
    import mlx.core as mx
    from mlx_lm import load

    model, tok = load(folder)
    model.set_dtype(mx.float32)
    return model, tok


def _check_ids(spec: EvalSpec) -> np.ndarray:
    """The runtime check's tokens: the start of the first window, as every runner reads it."""
    return spec.window_ids()[0][:RUNTIME_CHECK_TOKENS].astype(np.int32)


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


def layer_of(name: str) -> str:
    """The shard a tensor goes to: its decoder layer ("model.layers.3"), or "" for the rest."""
    m = re.match(r".*?\.layers\.\d+(?=\.)", name)
    return m[0] if m else ""


def write_checkpoint(folder: str, out: Path) -> int:
    """In MLX: the 16-bit checkpoint of the exact weights into `out`, under the source's tensor names, a shard
    per decoder layer (and one for the rest), each computed only as it is written. Returns the shard count.

    The weights are dequantized in float32 (scale x q + bias as the runtime's float32 scales give them) and
    stored as float16, whatever the source's 16-bit type: bfloat16's 8-bit mantissa would round them 16 times
    more coarsely, enough to part from mlx-lm's own run (KLD 0.075 over the runtime check's 64 tokens on the
    Mixtral-dimension synthetic, against 0.01 allowed)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.utils import dequantize_model, load_model

    config = json.loads((Path(folder) / "config.json").read_text())
    model, _ = load_model(Path(folder), lazy=True)
    model.set_dtype(mx.float32)  # the scales, biases and norms; lazy, as everything here until a shard is saved
    weights = source_names({k: v.astype(mx.float16) for k, v in tree_flatten(dequantize_model(model).parameters())},
                           str(config.get("model_type") or ""))
    # The lazy arrays in `weights` must be all that refer to the rest: an evaluated array that anything else
    # holds (the model's modules, the float32 dequantized values) stays in memory.
    del model
    groups: dict[str, list[str]] = {}
    for name in weights:
        groups.setdefault(layer_of(name), []).append(name)
    n, index = len(groups), {}
    for k, names in enumerate(groups.values(), 1):
        shard = f"model-{k:05d}-of-{n:05d}.safetensors"
        # A tensor at a time, so that one tensor's float32 values exist at once (a MoE layer's stacked experts of
        # one projection: 1.9 GB at Mixtral's dimensions), not the layer's. Popped: once written, nothing holds
        # this layer's dequantized (or quantized) arrays.
        arrays = {}
        for name in names:
            arrays[name] = weights.pop(name)
            mx.eval(arrays[name])
        mx.save_safetensors(str(out / shard), arrays, metadata={"format": "pt"})
        del arrays
        index.update({name: shard for name in names})
    mx.clear_cache()  # MLX keeps freed buffers for reuse; transformers runs next in this process
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    for key in ("quantization", "quantization_config"):
        config.pop(key, None)
    # transformers loads with the config's dtype: bfloat16 would round the float16 weights again.
    config.update({k: "float16" for k in ("torch_dtype", "dtype") if k in config} or {"torch_dtype": "float16"})
    (out / "config.json").write_text(json.dumps(config))
    for name in _TOKENIZER_FILES:
        if (Path(folder) / name).is_file():
            shutil.copy(Path(folder) / name, out / name)
    return n


def mlx_smoke(model, tok, spec: EvalSpec) -> dict | None:
    """The smoke test as mlx-lm users run the folder: mlx-lm's generate, greedy, stopping at its EOS ids."""
    from mlx_lm import stream_generate

    hf = tok._tokenizer  # the transformers tokenizer mlx-lm wraps

    def generate(prompt: str, max_tokens: int, special: bool = True) -> tuple[str, str | None]:
        new, end = [], None
        for r in stream_generate(model, tok, hf(prompt, add_special_tokens=False)["input_ids"], max_tokens=max_tokens):
            if r.token in tok.eos_token_ids:
                end = hf.convert_ids_to_tokens(r.token)
                break
            new.append(r.token)
        return hf.decode(new, skip_special_tokens=not special), end

    return chat_turns(generate, hf_runner.template_render(hf), replace(spec, probes=None),
                      "the folder has no chat template").get("smoke")


@contextmanager
def _scratch(spec: EvalSpec):
    """The spec's scratch folder (kept between rounds), or a temporary one beside the tokens."""
    if spec.scratch:
        Path(spec.scratch).mkdir(parents=True, exist_ok=True)
        yield Path(spec.scratch)
    else:
        with tempfile.TemporaryDirectory(prefix="mlx-dequantized-", dir=Path(spec.tokens).parent) as tmp:
            yield Path(tmp)


def evaluate(folder: str, spec: EvalSpec) -> EvalOutput:
    import mlx.core as mx
    import torch

    with _scratch(spec) as scratch:
        checkpoint, record = scratch / "checkpoint", scratch / "prepared.json"
        made_with = versions("mlx", "mlx-lm")
        prepared = json.loads(record.read_text()) if record.exists() else {}
        if prepared.get("made_with") != made_with or not checkpoint.is_dir():
            record.unlink(missing_ok=True)
            with atomic_dir(checkpoint) as tmp:
                write_checkpoint(folder, tmp)
            prepared = {"made_with": made_with}
            record.write_text(json.dumps(prepared))
        parity = Parity.from_dict(prepared["parity"]) if "parity" in prepared else None
        ids, smoke = _check_ids(spec), None
        chat = spec.chat and spec.smoke is not None
        if parity is None or chat:
            model, tok = _runtime(folder)
            if parity is None:
                def mlx_logits(window: np.ndarray) -> np.ndarray:
                    return np.array(model(mx.array(window)[None])[0].astype(mx.float32))

                raw = mlx_logits(ids)
                ours = log_softmax(raw)
                # mlx-lm must not see later tokens either (causality.py); its run of `ids` is the probe's first half.
                _, twin, cut = causality.probe_windows(ids, 0, len(ids), raw.shape[-1])
                prepared["causality"] = causality.compare("mlx-lm", raw, mlx_logits(twin), 0, cut).check().to_dict()
            if chat:
                smoke = mlx_smoke(model, tok, spec)
            del model, tok
            mx.clear_cache()  # MLX keeps freed buffers for reuse; transformers runs next
        # transformers scores and writes the probes' replies; the smoke test is mlx-lm's own (above).
        scoring = replace(spec, reference=True, smoke=None)
        runtime = hf_runner.TransformersRuntime(str(checkpoint), scoring)
        if parity is None:
            with torch.inference_mode():
                logits = runtime.model(torch.from_numpy(ids.astype(np.int64))[None].to(runtime.device)).logits[0]
            parity = Parity.measure(f"mlx-lm, {Path(folder).name}, against transformers on the same weights",
                                    [log_softmax(logits.float().cpu().numpy())], [ours])
            if not parity.passed:
                sys.exit(f"error: mlx-lm does not reproduce its own folder's weights as transformers runs them "
                         f"({parity.problems()}, over {parity.tokens_scored} tokens): it misreads the model's "
                         "config.json, so the folder would run wrong in mlx-lm")
            record.write_text(json.dumps(prepared | {"parity": parity.to_dict()}))
        result = run(runtime, scoring)
        del runtime  # its memory-mapped checkpoint, before a temporary one is removed
    return replace(result, smoke=smoke, parity=parity.to_dict(), note=(
        f"exact weights (dequantized by MLX) scored through transformers; smoke test with mlx-lm's generate "
        f"(quantized, float32 activations); mlx-lm vs transformers on the same weights: KLD {parity.kld_mean:.5f}, "
        f"top-1 {parity.top1_agreement:.0%} over {parity.tokens_scored} tokens"))


if __name__ == "__main__":
    sys.exit(runner_main(sys.argv[1:], {"evaluate": evaluate}))
