"""Child process: make one compressed-tensors folder with llm-compressor's own `oneshot` and a recipe of its
modifiers. It runs under the Python of llm-compressor's environment (pyproject's [tool.quantkit.environments]:
llm-compressor pins a torch and a transformers the main environment cannot take), so it imports nothing of quantkit.

Usage: python tool.py SPEC.json
SPEC: source, out, scheme (FP8_DYNAMIC | W4A16 | W8A8 | NVFP4A16), group_size (W4A16), ignore (module names
left unquantized), threads, calibration {file, samples, seq_len} (the schemes that calibrate; `file`, the text the
build process read: never the evaluation text).
llm-compressor prints its own progress ("(3/31): Calibrating: ...", a line per layer) and writes the recipe it ran
into the folder (recipe.yaml).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

CALIBRATED = {"W4A16", "W8A8"}


def recipe(spec: dict) -> list:
    """llm-compressor's modifiers for the scheme: its presets, except W4A16's group size, which the profile sets."""
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

    scheme, ignore = spec["scheme"], spec["ignore"]
    if scheme in ("FP8_DYNAMIC", "NVFP4A16"):  # weights only, or dynamic activations: no calibration
        return [QuantizationModifier(targets="Linear", scheme=scheme, ignore=ignore)]
    if scheme == "W4A16":
        from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

        weights = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group",
                                   group_size=spec["group_size"])
        return [GPTQModifier(config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights)},
                             ignore=ignore)]
    if scheme == "W8A8":  # INT8 weights and activations: SmoothQuant moves the activations' outliers first
        from llmcompressor.modifiers.transform import SmoothQuantModifier

        return [SmoothQuantModifier(smoothing_strength=0.8), GPTQModifier(targets="Linear", scheme="W8A8", ignore=ignore)]
    raise SystemExit(f"error: llm-compressor has no scheme {scheme!r} here")


def calibration(spec: dict, tokenizer):
    """`samples` consecutive slices of `seq_len` tokens of the calibration text, as a datasets.Dataset of ids."""
    from datasets import Dataset

    cal = spec["calibration"]
    ids = tokenizer(Path(cal["file"]).read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
    size = cal["seq_len"]
    rows = [ids[i * size:(i + 1) * size] for i in range(min(cal["samples"], len(ids) // size))]
    if not rows:
        raise SystemExit(f"error: the calibration text has {len(ids)} tokens, fewer than seq_len {size}")
    return Dataset.from_dict({"input_ids": rows, "attention_mask": [[1] * len(r) for r in rows]})


def main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    import torch

    torch.set_num_threads(spec.get("threads") or os.cpu_count() or 1)
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(spec["source"], dtype="auto")
    tokenizer = AutoTokenizer.from_pretrained(spec["source"])
    if spec["scheme"] in CALIBRATED:
        data = calibration(spec, tokenizer)
        oneshot(model=model, recipe=recipe(spec), dataset=data, num_calibration_samples=len(data),
                max_seq_length=spec["calibration"]["seq_len"])
    else:
        oneshot(model=model, recipe=recipe(spec))
    model.save_pretrained(spec["out"], save_compressed=True)
    tokenizer.save_pretrained(spec["out"])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
