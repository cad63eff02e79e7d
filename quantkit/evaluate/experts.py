"""A MoE's experts loaded as the checkpoint stores them: one module per expert, its weights views of the
memory-mapped safetensors.

transformers 5 fuses a Mixtral layer's experts on load (`conversion_mapping.py`: `MergeModulelist` and
`Concatenate`, a `torch.stack` and a `torch.cat`), which makes a new anonymous copy of every expert weight:
90 GB for Mixtral-8x7B. ModelCloud's defuser (which GPTQModel requires and calls before its own loads) swaps
the fused block for per-expert `nn.Linear`s and maps the checkpoint's names by renaming only, so nothing is
copied, and the per-expert names GPTQModel writes into a MoE's GPTQ folder match too.

The patch is process-wide, so it is applied only in evaluation child processes, before their first load.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

FUSED = "fused"  # spec["experts"]: transformers' own fused load (what the defused load is compared with)


def is_moe(config: dict) -> bool:
    return int(config.get("num_local_experts") or config.get("num_experts") or 0) > 1


def defusable(model_type: str) -> bool:
    """Does the installed defuser know this model type? (Without defuser, as in a GGUF-only environment,
    transformers fuses the experts and the plan counts the copy.)"""
    if importlib.util.find_spec("defuser") is None:
        return False
    from defuser.model_registry import MODEL_CONFIG
    from defuser.utils.common import is_supported_transformers_version

    return model_type in MODEL_CONFIG and is_supported_transformers_version()


def keeps_experts_mapped(config: dict) -> bool:
    """Will the runners load this checkpoint's experts without a fused copy?"""
    return is_moe(config) and defusable(str(config.get("model_type") or ""))


def defuse(folder: str, spec: dict | None = None) -> bool:
    """Before the first load of `folder` in this process: patch transformers to keep its experts per module.
    False for a dense model, a fused load asked for (spec["experts"] == "fused"), or a MoE defuser does not
    know."""
    config = json.loads((Path(folder) / "config.json").read_text())
    if (spec or {}).get("experts") == FUSED or not keeps_experts_mapped(config):
        return False
    from defuser import replace_fused_blocks

    return bool(replace_fused_blocks(config["model_type"]))
