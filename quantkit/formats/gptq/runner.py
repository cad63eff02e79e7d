"""Child process: score a GPTQ or AWQ folder as evaluate/hf_runner.py scores any folder transformers loads, loaded
as its users load it (transformers, with GPTQModel's kernels). When transformers leaves weights of it unset (seen:
GPTQModel writes a MoE's experts one module each, transformers 5 expects them fused), the folder is measured
through GPTQModel's own loader instead, and the report says so.

  python -m quantkit.formats.gptq.runner evaluate FOLDER SPEC.json OUT.json
"""

from __future__ import annotations

import sys

from ...evaluate import hf_runner
from ...evaluate.protocol import EvalOutput, EvalSpec, runner_main


def load(folder: str, spec: EvalSpec):
    import torch
    import transformers

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, unread = hf_runner.load_with_transformers(folder, device, spec)
    if not unread:
        return model, device, ""
    from gptqmodel import GPTQModel

    note = (f"transformers {transformers.__version__} cannot load this folder: it does not read {len(unread)} weight(s) "
            f"(such as {unread[0]}); measured through GPTQModel's own loader, which reads it")
    del model
    return GPTQModel.load(folder, device=device).model.eval(), device, note


def evaluate(folder: str, spec: EvalSpec) -> EvalOutput:
    return hf_runner.evaluate(folder, spec, load=load)


if __name__ == "__main__":
    sys.exit(runner_main(sys.argv[1:], {"evaluate": evaluate}))
