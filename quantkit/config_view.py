"""The source as runtimes written for transformers 4 read it: a folder of links to the checkpoint's files,
with config.json given the top-level keys they look for.

transformers 5 moved `rope_theta` and `rope_scaling` into `rope_parameters`. exllamav2 0.3 and mlx-lm 0.32
read the top-level keys and, finding none, silently use a default base of 10000: measured on the sample,
whose base is 100000, exllamav2 then scored perplexity 202 on text where transformers scores 11.7. Both
converters copy this config.json into every output folder, so their folders load right in exllamav2,
TabbyAPI and mlx-lm too.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any


def transformers4_config(config: dict[str, Any]) -> dict[str, Any]:
    """`config` with the keys transformers 4 wrote added (the transformers 5 ones are kept), in the shapes
    exllamav2 0.3.2's ExLlamaV2Config asserts (config.py): `partial_rotary_factor` at the top level; a
    `rope_scaling` with `rope_type` or `type`, never both; yarn's and llama3's `original_max_position_embeddings`
    inside `rope_scaling` (longrope's at the top level); `bos_token_id` and `pad_token_id` single ids, not lists;
    and the same for a multimodal model's `text_config`, where its rope fields are read too."""
    out = dict(config)
    if isinstance(config.get("text_config"), dict):
        out["text_config"] = transformers4_config(config["text_config"])
    rope = config.get("rope_parameters")
    if isinstance(rope, dict) and rope and "rope_theta" not in rope and all(isinstance(v, dict) for v in rope.values()):
        # One entry per attention type (Gemma 3): the runtimes take the sliding layers' base from their own tables.
        rope = rope.get("full_attention") or next(iter(rope.values()))
    if isinstance(rope, dict):
        if "rope_theta" in rope:
            out.setdefault("rope_theta", rope["rope_theta"])
        if "partial_rotary_factor" in rope:
            out.setdefault("partial_rotary_factor", rope["partial_rotary_factor"])
        kind = rope.get("rope_type") or rope.get("type") or "default"
        if kind != "default" and not config.get("rope_scaling"):
            out["rope_scaling"] = {k: v for k, v in rope.items() if k not in ("rope_theta", "partial_rotary_factor")}
    if isinstance(out.get("rope_scaling"), dict):
        scaling = dict(out["rope_scaling"])
        if "type" in scaling and "rope_type" in scaling:
            del scaling["type"]  # exllamav2 asserts that only one of them is given
        kind = scaling.get("rope_type") or scaling.get("type")
        if kind in ("yarn", "llama3") and "original_max_position_embeddings" in config:
            scaling.setdefault("original_max_position_embeddings", config["original_max_position_embeddings"])
        if kind in ("longrope", "su") and "original_max_position_embeddings" in scaling:
            out.setdefault("original_max_position_embeddings", scaling["original_max_position_embeddings"])
        out["rope_scaling"] = scaling
    for key in ("bos_token_id", "pad_token_id"):  # exllamav2 reads an int, and refuses a list
        if isinstance(out.get(key), list):
            out[key] = out[key][0] if out[key] else None
    if "dtype" in config and "torch_dtype" not in config:
        out["torch_dtype"] = config["dtype"]
    return out


def source_view(source: Path, folder: Path) -> Path:
    """Make `folder`: a link to each file of `source`, and config.json translated. Made anew each time, so a
    changed source or translation never leaves a stale view."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for f in source.iterdir():
        if f.is_file() and f.name != "config.json":
            os.symlink(f.resolve(), folder / f.name)
    config = json.loads((source / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(transformers4_config(config), indent=2))
    return folder
