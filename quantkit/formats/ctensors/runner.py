"""Child process: score a compressed-tensors folder as evaluate/hf_runner.py scores any folder transformers loads,
through transformers' compressed-tensors support (it decompresses the weights on the CPU). An NVFP4 folder is loaded
in bfloat16: compressed-tensors decompresses its weights to bfloat16, and a float16 model would then multiply the two
types together (transformers stops: "expected m1 and m2 to have the same dtype"); the report says so.

  python -m quantkit.formats.ctensors.runner evaluate FOLDER SPEC.json OUT.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ...evaluate import hf_runner
from ...evaluate.protocol import EvalOutput, EvalSpec, runner_main

BFLOAT16_FORMATS = {"nvfp4-pack-quantized"}


def load(folder: str, spec: EvalSpec):
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    packed = json.loads((Path(folder) / "config.json").read_text())["quantization_config"].get("format")
    kwargs = {"dtype": torch.bfloat16} if packed in BFLOAT16_FORMATS else {}
    model, unread = hf_runner.load_with_transformers(folder, device, spec, **kwargs)
    hf_runner.refuse_unread(folder, unread)
    note = f"scored in bfloat16, the type compressed-tensors decompresses {packed} weights to" if kwargs else ""
    return model, device, note


def evaluate(folder: str, spec: EvalSpec) -> EvalOutput:
    return hf_runner.evaluate(folder, spec, load=load)


if __name__ == "__main__":
    sys.exit(runner_main(sys.argv[1:], {"evaluate": evaluate}))
