#!/usr/bin/env python3
"""Synthetic fp16 checkpoints of real shapes with random weights, for scale tests and benchmarks.
The tokenizer, chat template and vocabulary are the sample's (real), so llama.cpp converts them like
any model of their architecture; the weights are noise, so their outputs are meaningless.

Shapes: tiny (a dense Llama at test size: 2 layers, hidden 256, untied head), 1b (TinyLlama-1.1B), 3b
(Llama-3.2-3B), 7b (Mistral-7B: 32 layers, hidden 4096, MLP 14336, 32 heads, 8 KV heads, untied head), mixtral
(Mixtral-8x7B's dimensions: 7b's with 8 experts of MLP 14336, top-2, bfloat16 as Mixtral ships; `--layers N`
makes N of its 32 layers, about 2.8 GB each, so its runs can be measured against N), moe (Mixtral-shaped:
8 experts, top-2 routing, Mixtral's tensor names, hidden 1024, 8 layers) and moe-tiny (the same layout at
test size). `--layers N` sets the layer count of any shape. `--dead-experts K` makes
the router never pick the last K experts of every layer (the embeddings carry a constant feature the
router reads), which is how calibration leaves experts without data in real MoE models.

Written as 2 GB shards with a safetensors index, like the Hub's large checkpoints, one shard in
memory at a time. Cached in ~/.cache/quantkit/synthetic/<name>/. `--header-only` writes every shard's real
safetensors header (names, shapes, dtypes, offsets) and leaves its data a hole in a sparse file: the whole
Mixtral-8x7B (93 GB) takes a few MB of disk, for `quantkit plan`, which reads headers only (its weights read
as zeros).
Usage: .venv/bin/python scripts/make_synthetic_model.py tiny|1b|3b|7b|mixtral|moe|moe-tiny [--layers N]
       [--dead-experts K] [--header-only] [--out DIR]
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import shutil
import struct
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from quantkit.paths import cache_dir  # noqa: E402
from quantkit.sample import SAMPLE_MARKER, ensure_sample  # noqa: E402

_LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}
_MISTRAL = {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "tie_word_embeddings": False,
            "sliding_window": None, "rope_theta": 1_000_000.0}
_MIXTRAL = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "tie_word_embeddings": False,
            "sliding_window": None, "rope_theta": 1_000_000.0, "num_local_experts": 8, "num_experts_per_tok": 2,
            "router_aux_loss_coef": 0.02, "output_router_logits": False, "router_jitter_noise": 0.0}
# Shapes of TinyLlama-1.1B, Llama-3.2-3B, Mistral-7B and a scaled-down Mixtral, with the sample's vocabulary.
SHAPES = {
    # Untied, so the head gets a trained model's spread of logits (below) and quantization errors show.
    "tiny": {**_LLAMA, "tie_word_embeddings": False, "hidden_size": 256, "intermediate_size": 768,
             "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 4},
    "1b": {**_LLAMA, "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
           "num_attention_heads": 32, "num_key_value_heads": 4},
    "3b": {**_LLAMA, "hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 28,
           "num_attention_heads": 24, "num_key_value_heads": 8},
    "7b": {**_MISTRAL, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
           "num_attention_heads": 32, "num_key_value_heads": 8},
    "mixtral": {**_MIXTRAL, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                "num_attention_heads": 32, "num_key_value_heads": 8, "dtype": "bfloat16"},
    "moe": {**_MIXTRAL, "hidden_size": 1024, "intermediate_size": 2048, "num_hidden_layers": 8,
            "num_attention_heads": 16, "num_key_value_heads": 4},
    "moe-tiny": {**_MIXTRAL, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 4,
                 "num_attention_heads": 8, "num_key_value_heads": 2},
}
SHARD_BYTES = 2_000_000_000


def tensors(cfg: dict):
    h, i, n = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    kv = h // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    experts = cfg.get("num_local_experts", 0)
    yield "model.embed_tokens.weight", (cfg["vocab_size"], h)
    for layer in range(n):
        p = f"model.layers.{layer}."
        yield p + "input_layernorm.weight", (h,)
        yield p + "post_attention_layernorm.weight", (h,)
        yield p + "self_attn.q_proj.weight", (h, h)
        yield p + "self_attn.k_proj.weight", (kv, h)
        yield p + "self_attn.v_proj.weight", (kv, h)
        yield p + "self_attn.o_proj.weight", (h, h)
        if experts:
            yield p + "block_sparse_moe.gate.weight", (experts, h)
            for e in range(experts):
                q = f"{p}block_sparse_moe.experts.{e}."
                yield q + "w1.weight", (i, h)
                yield q + "w2.weight", (h, i)
                yield q + "w3.weight", (i, h)
        else:
            yield p + "mlp.gate_proj.weight", (i, h)
            yield p + "mlp.up_proj.weight", (i, h)
            yield p + "mlp.down_proj.weight", (h, i)
    yield "model.norm.weight", (h,)
    if not cfg.get("tie_word_embeddings", True):
        yield "lm_head.weight", (cfg["vocab_size"], h)


def write_header_only(path: Path, shapes: dict[str, tuple[int, ...]], dtype: str) -> None:
    """A safetensors file with its real header and no data: the data region is left a hole (a sparse file).
    safetensors writes no file without the tensors' bytes, so the header is written as its format specifies:
    the header's length (8 bytes, little-endian), the JSON header padded to 8 bytes, then the data."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, dims in shapes.items():
        n = 2 * _numel(dims)  # 16-bit weights
        header[name] = {"dtype": dtype, "shape": list(dims), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)


def _numel(dims: tuple[int, ...]) -> int:
    n = 1
    for d in dims:
        n *= d
    return n


def default_out(size: str, dead_experts: int = 0, layers: int | None = None, header_only: bool = False) -> Path:
    name = {"moe": "Synthetic-Mixtral", "moe-tiny": "Synthetic-Mixtral-Tiny", "7b": "Synthetic-Mistral-7B",
            "mixtral": "Synthetic-Mixtral-8x7B", "tiny": "Synthetic-Llama-Tiny"}.get(
        size, f"Synthetic-Llama-{size.upper()}")
    name += (f"-L{layers}" if layers else "") + (f"-dead{dead_experts}" if dead_experts else "")
    return cache_dir() / "synthetic" / (name + ("-header-only" if header_only else ""))


def make(size: str, out: Path | None = None, dead_experts: int = 0, layers: int | None = None,
         header_only: bool = False) -> Path:
    out = out or default_out(size, dead_experts, layers, header_only)
    shape = SHAPES[size] | ({"num_hidden_layers": layers} if layers else {})
    if _made(out, shape):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # One maker at a time: the tests ask for the same checkpoint from parallel workers, and two makers sharing the
    # .partial folder wreck each other's shards. A second one waits, then finds it made.
    with open(out.with_name(out.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _made(out, shape):
            _write(out, shape, dead_experts, header_only)
    return out


def _made(out: Path, shape: dict) -> bool:
    if not (out / ".complete").exists():
        return False
    cached = json.loads((out / "config.json").read_text())
    if not all(cached.get(k) == v for k, v in shape.items()):  # made with another shape (shapes change between versions)
        return False
    (out / SAMPLE_MARKER).unlink(missing_ok=True)  # copied by earlier versions of this script
    return True


def _write(out: Path, shape: dict, dead_experts: int, header_only: bool) -> None:
    import torch
    from safetensors.torch import save_file

    dtype = getattr(torch, shape.get("dtype", "float16"))
    n_experts = shape.get("num_local_experts", 0)
    if dead_experts and not 0 < dead_experts <= n_experts - shape.get("num_experts_per_tok", 0):
        raise SystemExit(f"--dead-experts needs a mixture-of-experts shape with more than {dead_experts} spare experts")
    sample = ensure_sample()
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in sample.iterdir():
        # Not the sample's marker: reports explain some of the sample's numbers by where its weights came from.
        if f.is_file() and f.suffix != ".safetensors" and f.name not in ("config.json", "README.md", SAMPLE_MARKER):
            shutil.copy(f, tmp / f.name)
    cfg = {**json.loads((sample / "config.json").read_text()), **shape}
    cfg["head_dim"] = cfg["hidden_size"] // cfg["num_attention_heads"]
    if "rope_theta" in shape and isinstance(cfg.get("rope_parameters"), dict):
        cfg["rope_parameters"] = {**cfg["rope_parameters"], "rope_theta": shape["rope_theta"]}
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    gen = torch.Generator().manual_seed(0)
    shards: list[list[str]] = []  # tensor names of each shard written so far
    current: dict = {}
    total = 0

    def flush() -> None:
        shards.append(list(current))
        path = tmp / f"part-{len(shards)}.safetensors"
        if header_only:
            write_header_only(path, current, {torch.float16: "F16", torch.bfloat16: "BF16"}[dtype])
        else:
            save_file(current, path, metadata={"format": "pt"})
        current.clear()

    def nbytes(t) -> int:
        return 2 * (_numel(t) if isinstance(t, tuple) else t.numel())

    for name, dims in tensors(cfg):
        if header_only:
            current[name] = tuple(dims)
        elif len(dims) > 1:
            t = torch.randn(dims, generator=gen) * 0.02
            if name == "lm_head.weight":
                # Logits with a spread of about 4 (as trained models have), not near-uniform ones: quantization
                # errors then show in KL-divergence and top-1 as they would in a real model.
                t *= 4 / (0.02 * dims[1] ** 0.5)
            elif dead_experts and name == "model.embed_tokens.weight":
                t[:, 0] = 1.0  # a feature every token carries, so the router can be made to ignore experts
            elif dead_experts and name.endswith("block_sparse_moe.gate.weight"):
                t[:, 0] = 1.0  # the same for every live expert: the other features choose among them
                t[-dead_experts:, 0] = -4.0  # always the lowest scores: never in the top k
            current[name] = t.to(dtype)
        else:
            current[name] = torch.ones(dims, dtype=dtype)
        total += nbytes(current[name]) // 2
        if sum(nbytes(t) for t in current.values()) >= SHARD_BYTES:
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
    dead = f" The router never picks the last {dead_experts} experts of a layer." if dead_experts else ""
    what = "parameters as headers only (sparse files with no data)" if header_only else "random parameters"
    (tmp / "README.md").write_text(f"Synthetic {cfg['architectures'][0]}-shaped checkpoint, {total / 1e9:.2f}B {dtype} "
                                   f"{what}, the sample's tokenizer.{dead} For quantkit's tests and benchmarks only.\n")
    (tmp / ".complete").touch()
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("size", choices=sorted(SHAPES))
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default: the shape's)")
    ap.add_argument("--dead-experts", type=int, default=0, help="experts per layer the router never picks (MoE shapes)")
    ap.add_argument("--header-only", action="store_true", help="real headers, no data (sparse files): for planning")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.layers is not None and args.layers < 1:
        raise SystemExit("--layers must be at least 1")
    print(make(args.size, args.out, args.dead_experts, args.layers, args.header_only))


if __name__ == "__main__":
    main()
