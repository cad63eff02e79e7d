"""Child process: mlx-lm's own converter, and the exact size of what it will write.

  python -m quantkit.formats.mlx.tool convert SPEC.json   one variant: mlx_lm's convert into SPEC's out
  python -m quantkit.formats.mlx.tool sizes SPEC.json     every variant's weight bytes, printed as JSON
                                                            {recipes, unsupported, sizes}

SPEC: source, and out + bits, group_size, recipe (convert) or variants: [{name, bits, group_size, recipe}]
(sizes). mlx and mlx-lm are imported only here: the build process never loads them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _predicate(recipe: str | None, model, group_size: int):
    if not recipe:
        return None
    from mlx_lm.convert import mixed_quant_predicate_builder

    return mixed_quant_predicate_builder(recipe, model, group_size)


def sizes(spec_path: str) -> None:
    """mlx-lm's own quantization applied to the model loaded lazily: mlx computes nothing until asked, so the
    quantized arrays' shapes and dtypes (hence their bytes) are known without quantizing a single weight."""
    from mlx.utils import tree_flatten
    from mlx_lm.convert import QUANT_RECIPES
    from mlx_lm.utils import _get_classes, load, quantize_model

    spec = json.loads(Path(spec_path).read_text())
    answer = {"recipes": list(QUANT_RECIPES), "unsupported": None, "sizes": None}
    try:
        _get_classes(json.loads((Path(spec["source"]) / "config.json").read_text()))
    except ValueError as e:
        answer["unsupported"] = str(e)
    if answer["unsupported"] or any(v.get("recipe") and v["recipe"] not in QUANT_RECIPES for v in spec["variants"]):
        print(json.dumps(answer))
        return
    out = {}
    for v in spec["variants"]:
        model, _, config = load(spec["source"], lazy=True, return_config=True)
        model, _ = quantize_model(model, config, v["group_size"], v["bits"],
                                  quant_predicate=_predicate(v.get("recipe"), model, v["group_size"]))
        params = tree_flatten(model.parameters())
        out[v["name"]] = {"weight_bytes": sum(a.nbytes for _, a in params),
                          "embedding_quantized": any(k.endswith("embed_tokens.scales") for k, _ in params),
                          "separate_head": any(k.startswith("lm_head.") for k, _ in params)}
    print(json.dumps({**answer, "sizes": out}))


def convert(spec_path: str) -> None:
    from mlx_lm.convert import convert as mlx_convert

    spec = json.loads(Path(spec_path).read_text())
    out = Path(spec["out"])
    if out.exists() and not any(out.iterdir()):
        out.rmdir()  # mlx-lm refuses to write into an existing folder
    mlx_convert(spec["source"], str(out), quantize=True, q_bits=spec["bits"], q_group_size=spec["group_size"],
                quant_predicate=spec.get("recipe") or None)


if __name__ == "__main__":
    commands = {"sizes": sizes, "convert": convert}
    if len(sys.argv) != 3 or sys.argv[1] not in commands:
        sys.exit("usage: python -m quantkit.formats.mlx.tool convert|sizes SPEC.json")
    commands[sys.argv[1]](sys.argv[2])
