"""Child process: quantize one GGUF with llama.cpp's llama_model_quantize.

Usage: python -m quantkit.backends.gguf_quantize_worker SRC DST FTYPE_VALUE THREADS [--dry-run]
llama.cpp logs each tensor (and every type fallback) to stderr; the parent reads that log.
"""

from __future__ import annotations

import ctypes
import sys


def main(argv: list[str]) -> int:
    src, dst, ftype, threads = argv[0], argv[1], int(argv[2]), int(argv[3])
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads
    params.dry_run = "--dry-run" in argv
    rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params))
    if rc != 0:
        print(f"error: llama_model_quantize returned {rc}", file=sys.stderr)
    return 1 if rc else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
