"""Exact GGUF sizes before anything is built: llama.cpp decides each tensor's type in a dry run of the
quantizer over a skeleton of the converted file, and gguf-py's block table gives each tensor's bytes."""

from __future__ import annotations

import platform
import re
from dataclasses import dataclass
from pathlib import Path

_TENSOR = re.compile(r"\[\s*\d+/\s*\d+\]\s+(?P<name>\S+)\s+- \[(?P<shape>[\d,\s]+)\], type =\s*(?P<cur>\w+),"
                     r".*?(?:\((?P<new>\w+)\))?\s*$")


# Types whose matrices llama.cpp's CPU backend copies into an interleaved layout when it loads a model
# (ggml-cpu/repack.cpp, for rows in multiples of 8): the copy sits next to the memory-mapped file, so
# these tensors count twice in an evaluation's memory. x86-64 with AVX2/AVX-512; ARM repacks more types.
REPACKED = {"Q4_0", "Q4_K", "IQ4_NL", "MXFP4", "Q2_K"} | (
    {"Q5_K", "Q6_K", "Q8_0"} if platform.machine() in ("aarch64", "arm64") else set())


@dataclass(frozen=True)
class SizePrediction:
    file_bytes: int
    fallbacks: int = 0  # tensors that cannot take the asked type (llama.cpp's warning count)
    repacked_bytes: int = 0  # of tensors llama.cpp's CPU backend copies when it loads the file (REPACKED)


def tensor_bytes(type_name: str, shape: list[int]) -> int:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[type_name.upper()]]
    rows = 1
    for n in shape[1:]:
        rows *= n
    return rows * (shape[0] // block) * size


def predict_from_dry_run(skeleton: Path, lines: list[str], alignment: int = 32) -> SizePrediction:
    """Size of the quantized file: the skeleton's header (metadata, vocabulary, tensor list) plus each
    tensor in the type the dry run chose, padded to the data alignment as the writer pads it."""
    from gguf import GGUFReader

    header = GGUFReader(skeleton).data_offset
    total, fallbacks, repacked = header, 0, 0
    for line in lines:
        if "falling back to" in line:
            fallbacks += 1
        m = _TENSOR.search(line)
        if not m:
            continue
        shape = [int(x) for x in m["shape"].split(",")]
        kind = (m["new"] or m["cur"]).upper()
        n_bytes = tensor_bytes(kind, shape)
        total += -(-n_bytes // alignment) * alignment
        # Matrices a matmul reads (the embeddings are looked up, not multiplied), rows in multiples of 8.
        if kind in REPACKED and not m["name"].startswith("token_embd") and len(shape) > 1 and shape[1] % 8 == 0:
            repacked += n_bytes
    return SizePrediction(total, fallbacks, repacked)
