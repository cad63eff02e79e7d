"""Child process: quantize one GGUF with llama.cpp's llama_model_quantize.

Usage: python -m quantkit.formats.gguf.quantize_tool SPEC_JSON
SPEC (or a list of them, run in turn, each log preceded by a "=== spec I" line): src, dst, ftype
(llama_ftype value), threads, dry_run, and optionally imatrix (path to an imatrix GGUF),
assume_imatrix (dry runs: choose types as if an imatrix were given), embeddings / output (ggml type
values), overrides ([[regex, ggml type value], ...]), metadata ({key: str or int}, written into the file).
llama.cpp logs each tensor (and every type fallback) to stderr; the parent reads that log.
"""

from __future__ import annotations

import ctypes
import json
import sys
from pathlib import Path


def load_imatrix(path: Path) -> dict[str, "object"]:
    """Per-tensor importance values from an imatrix GGUF, normalised as llama.cpp's quantize tool does:
    the sum of squared activations divided by the number of tokens that produced it (per expert)."""
    import numpy as np
    from gguf import GGUFReader

    tensors = {t.name: np.asarray(t.data, dtype=np.float32).reshape(-1) for t in GGUFReader(path).tensors}
    out = {}
    for name, sums in tensors.items():
        if not name.endswith(".in_sum2"):
            continue
        base = name[: -len(".in_sum2")]
        counts = tensors[base + ".counts"]
        per = sums.reshape(len(counts), -1)
        values = np.where(counts[:, None] > 0, per / np.maximum(counts[:, None], 1), 1.0)
        out[base] = np.ascontiguousarray(values.reshape(-1), dtype=np.float32)
    if not out:
        raise SystemExit(f"error: {path.name} holds no importance data")
    return out


def quantize(spec: dict) -> int:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = spec["ftype"]
    params.nthread = spec["threads"]
    params.dry_run = bool(spec.get("dry_run"))
    if spec.get("embeddings") is not None:
        params.token_embedding_type = spec["embeddings"]
    if spec.get("output") is not None:
        params.output_tensor_type = spec["output"]
    keep = []  # ctypes buffers must outlive the call
    if spec.get("overrides"):
        rows = [(p.encode(), t) for p, t in spec["overrides"]] + [(None, 0)]  # a null pattern ends the list
        arr = (llama_cpp.llama_model_tensor_override * len(rows))()
        for i, (pattern, t) in enumerate(rows):
            arr[i].pattern, arr[i].type = pattern, t
        keep.append(arr)
        params.tt_overrides = ctypes.cast(arr, ctypes.POINTER(llama_cpp.llama_model_tensor_override))
    if spec.get("imatrix"):
        data = load_imatrix(Path(spec["imatrix"]))
        arr = (llama_cpp.llama_model_imatrix_data * (len(data) + 1))()  # zeroed last entry ends the list
        for i, (name, values) in enumerate(data.items()):
            keep += [name.encode(), values]
            arr[i].name = keep[-2]
            arr[i].data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            arr[i].size = values.size
        keep.append(arr)
        params.imatrix = ctypes.cast(arr, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
        print(f"imatrix: {len(data)} entries from {Path(spec['imatrix']).name}", flush=True)
    elif spec.get("assume_imatrix"):
        # Some types are chosen differently when an imatrix is present; one entry is enough to say so.
        one = (ctypes.c_float * 1)(1.0)
        arr = (llama_cpp.llama_model_imatrix_data * 2)()
        arr[0].name, arr[0].data, arr[0].size = b"(dry run)", one, 1
        keep += [one, arr]
        params.imatrix = ctypes.cast(arr, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
    if spec.get("metadata"):
        kvs = (llama_cpp.llama_model_kv_override * (len(spec["metadata"]) + 1))()  # empty key ends the list
        for i, (key, value) in enumerate(spec["metadata"].items()):
            kvs[i].key = key.encode()[:127]
            if isinstance(value, int):
                kvs[i].tag, kvs[i].value.val_i64 = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_INT, value
            else:
                kvs[i].tag, kvs[i].value.val_str = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_STR, str(value).encode()[:127]
        keep.append(kvs)
        params.kv_overrides = ctypes.cast(kvs, ctypes.POINTER(llama_cpp.llama_model_kv_override))
    rc = llama_cpp.llama_model_quantize(spec["src"].encode(), spec["dst"].encode(), ctypes.byref(params))
    if rc != 0:
        print(f"error: llama_model_quantize returned {rc}", file=sys.stderr)
    return 1 if rc else 0


def main(arg: str) -> int:
    specs = json.loads(arg)
    if isinstance(specs, dict):
        return quantize(specs)
    for i, spec in enumerate(specs):
        print(f"=== spec {i}", file=sys.stderr, flush=True)
        if quantize(spec):
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
