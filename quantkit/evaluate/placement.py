"""Where each tensor of a checkpoint goes in the model transformers builds for it, from the names and shapes in
the safetensors headers alone: no weight is read.

The evaluation loads (hf_runner) refuse a model transformers leaves partly unset, but only once they run,
after the conversions and quantizations of a build. A MoE is where names go wrong (a router called `router`
where transformers expects `gate`, experts numbered under a name the architecture does not use), so the plan
runs this check on a MoE before anything is made (`python -m quantkit.evaluate.placement FOLDER OUT.json`),
in a child process because it imports transformers. The streamed reference (evaluate/streamed.py) reads its
tensors through the same placement.

The model is built on the meta device exactly as the evaluation builds it (experts one module each where
defuser knows the architecture: evaluate/experts.py), and the checkpoint's names go through transformers' own
renamings and converters for it (`conversion_mapping`), so a name is judged by the loader that will read it.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..source import safetensors_header


@dataclass
class Placement:
    """How transformers would read a checkpoint into its model."""

    places: dict[str, tuple[Path, str]] = field(default_factory=dict)  # parameter -> (file, checkpoint name), read as stored
    converted: list[str] = field(default_factory=list)  # checkpoint names transformers converts on load (fused, split)
    unread: list[str] = field(default_factory=list)  # "NAME (why)": parameters left unset, tensors with no place, wrong shapes


def checkpoint_tensors(folder: Path) -> dict[str, tuple[Path, list[int]]]:
    """{checkpoint tensor name: (its safetensors file, its shape)}, from the files' headers."""
    tensors = {}
    for f in sorted(folder.glob("*.safetensors")):
        tensors.update({k: (f, t["shape"]) for k, t in safetensors_header(f).items() if k != "__metadata__"})
    return tensors


def meta_model(folder: str, spec: dict | None = None):
    """(model, config): the checkpoint's model with no weights (meta device), in its stored dtype, its experts
    kept as the evaluation keeps them."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from .experts import defuse

    config = AutoConfig.from_pretrained(folder)
    defuse(folder, spec)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(config, "dtype", None) or torch.float16)
    return model.eval(), config


def place(model, folder: Path) -> Placement:
    """The checkpoint's tensors in `model` through transformers' renamings and converters for it."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, rename_source_key

    transforms = get_model_conversion_mapping(model)
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
    params = dict(model.named_parameters())
    meta = model.state_dict()
    out, reached, unexpected, shapes = Placement(), set(), [], []
    for key, (file, shape) in checkpoint_tensors(folder).items():
        name, pattern = rename_source_key(key, renamings, converters, model.base_model_prefix, meta)
        if pattern is not None:
            out.converted.append(key)
            reached.add(name)
        elif name in params:
            out.places[name] = (file, key)
            reached.add(name)
            if list(params[name].shape) != list(shape):
                shapes.append(f"{key} (shape {list(shape)} in {file.name}, {list(params[name].shape)} in the model)")
        elif name not in meta:  # a persistent buffer stored in the file is computed by the model, not read
            unexpected.append(key)
    tied = getattr(model, "all_tied_weights_keys", {})
    out.unread = ([f"{k} (unset)" for k in params if k not in reached and k not in tied]
                  + [f"{k} (in the files, not in the model)" for k in unexpected] + shapes)
    return out


def check(folder: str, out: str) -> None:
    """Write {"unread": [...], "converted": N} for the plan (an error building the model is the child's failure)."""
    model, _ = meta_model(folder)
    placement = place(model, Path(folder))
    Path(out).write_text(json.dumps({"unread": placement.unread, "converted": len(placement.converted)}))


if __name__ == "__main__":
    check(*sys.argv[1:3])


def refuse_unplaced(folder: Path, model_type: str) -> None:
    """Plan time: refuse a checkpoint transformers would read only in part (SourceError naming the tensors),
    before anything is built from it; scoring it would measure random weights."""
    import tempfile

    from ..errors import SourceError
    from ..procs import run_python

    with tempfile.TemporaryDirectory(prefix="quantkit-placement-") as tmp:
        out = Path(tmp) / "placement.json"
        run_python(["-m", "quantkit.evaluate.placement", str(folder), str(out)],
                   what="the check of which tensors transformers reads")
        unread = json.loads(out.read_text())["unread"]
    if unread:
        raise SourceError(f"transformers' {model_type} loader would leave {len(unread)} weight(s) of {folder.name} unread, "
                          f"so its evaluation would score random weights: {', '.join(unread[:4])}"
                          + (", ..." if len(unread) > 4 else ""),
                          f"name the tensors as transformers' {model_type} checkpoints do (its router, experts and "
                          "layers), or fix config.json's model_type if it is another architecture")
