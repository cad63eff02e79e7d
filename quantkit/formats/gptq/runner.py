"""Child process: score a GPTQ or AWQ folder as evaluate/hf_worker.py scores any folder transformers loads, loaded
as its users load it (transformers, with GPTQModel's kernels). When transformers leaves weights of it unset (seen:
GPTQModel writes a MoE's experts one module each, transformers 5 expects them fused), the folder is measured
through GPTQModel's own loader instead, and the report says so.

  python -m quantkit.formats.gptq.evaluate_worker evaluate FOLDER SPEC.json OUT.json
"""

from __future__ import annotations

import sys

from ...evaluate import hf_worker
from ...evaluate.metrics import worker_main


def load(folder: str, spec: dict):
    import torch
    import transformers

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, unread = hf_worker.load_with_transformers(folder, device, spec)
    if not unread:
        return model, device, ""
    from gptqmodel import GPTQModel

    note = (f"transformers {transformers.__version__} cannot load this folder: it does not read {len(unread)} weight(s) "
            f"(such as {unread[0]}); measured through GPTQModel's own loader, which reads it")
    del model
    return GPTQModel.load(folder, device=device).model.eval(), device, note


def evaluate(folder: str, spec: dict) -> dict:
    return hf_worker.evaluate(folder, spec, load=load)


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:], {"evaluate": evaluate}))
