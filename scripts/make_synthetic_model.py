#!/usr/bin/env python3
"""A Llama-shaped fp16 checkpoint of about 1B or 3B parameters with random weights, for the memory
and throughput benchmarks. The tokenizer, chat template and vocabulary are the sample's (real),
so llama.cpp converts it like any Llama; the weights are noise, so its outputs are meaningless.

Written as 2 GB shards with a safetensors index, like the Hub's large checkpoints, one shard in
memory at a time. Cached in ~/.cache/quantkit/synthetic/<size>/.
Usage: .venv/bin/python scripts/make_synthetic_model.py 1b|3b [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from quantkit.paths import cache_dir  # noqa: E402
from quantkit.sample import ensure_sample  # noqa: E402

# Shapes of TinyLlama-1.1B and Llama-3.2-3B, with the sample's 49152-token vocabulary.
SHAPES = {
    "1b": {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32,
           "num_key_value_heads": 4},
    "3b": {"hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 28, "num_attention_heads": 24,
           "num_key_value_heads": 8},
}
SHARD_BYTES = 2_000_000_000


def tensors(cfg: dict):
    h, i, n = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    kv = h // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    yield "model.embed_tokens.weight", (cfg["vocab_size"], h)
    for layer in range(n):
        p = f"model.layers.{layer}."
        yield p + "input_layernorm.weight", (h,)
        yield p + "post_attention_layernorm.weight", (h,)
        yield p + "self_attn.q_proj.weight", (h, h)
        yield p + "self_attn.k_proj.weight", (kv, h)
        yield p + "self_attn.v_proj.weight", (kv, h)
        yield p + "self_attn.o_proj.weight", (h, h)
        yield p + "mlp.gate_proj.weight", (i, h)
        yield p + "mlp.up_proj.weight", (i, h)
        yield p + "mlp.down_proj.weight", (h, i)
    yield "model.norm.weight", (h,)


def make(size: str, out: Path) -> Path:
    import torch
    from safetensors.torch import save_file

    if (out / ".complete").exists():
        return out
    sample = ensure_sample()
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in sample.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name not in ("config.json", "README.md"):
            shutil.copy(f, tmp / f.name)
    cfg = {**json.loads((sample / "config.json").read_text()), **SHAPES[size]}
    cfg["head_dim"] = cfg["hidden_size"] // cfg["num_attention_heads"]
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    gen = torch.Generator().manual_seed(0)
    shards: list[list[str]] = []  # tensor names of each shard written so far
    current: dict = {}
    total = 0

    def flush() -> None:
        shards.append(list(current))
        save_file(current, tmp / f"part-{len(shards)}.safetensors", metadata={"format": "pt"})
        current.clear()

    for name, shape in tensors(cfg):
        if len(shape) > 1:
            current[name] = (torch.randn(shape, generator=gen) * 0.02).to(torch.float16)
        else:
            current[name] = torch.ones(shape, dtype=torch.float16)
        total += current[name].numel()
        if sum(t.numel() * 2 for t in current.values()) >= SHARD_BYTES:
            flush()
    if current:
        flush()
    n = len(shards)
    weight_map = {}
    for k, names in enumerate(shards, 1):
        final = f"model-{k:05d}-of-{n:05d}.safetensors"
        os.replace(tmp / f"part-{k}.safetensors", tmp / final)
        weight_map.update({name: final for name in names})
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total * 2},
                                                                   "weight_map": weight_map}, indent=1))
    (tmp / "README.md").write_text(f"Synthetic Llama-shaped checkpoint, {total / 1e9:.2f}B random fp16 parameters, "
                                   "the sample's tokenizer. For quantkit's benchmarks only.\n")
    (tmp / ".complete").touch()
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("size", choices=sorted(SHAPES))
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    print(make(args.size, args.out or cache_dir() / "synthetic" / f"Synthetic-Llama-{args.size.upper()}"))


if __name__ == "__main__":
    main()
