"""Exact GGUF sizes before anything is built: llama.cpp decides each tensor's type in a dry run of the
quantizer over a skeleton of the converted file, and gguf-py's block table gives each tensor's bytes."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

_TENSOR = re.compile(r"\[\s*\d+/\s*\d+\]\s+(?P<name>\S+)\s+- \[(?P<shape>[\d,\s]+)\], type =\s*(?P<cur>\w+),"
                     r".*?(?:\((?P<new>\w+)\))?\s*$")


@dataclass(frozen=True)
class SizePrediction:
    file_bytes: int
    fallbacks: int = 0  # tensors that cannot take the asked type (llama.cpp's warning count)


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
    total, fallbacks = header, 0
    for line in lines:
        if "falling back to" in line:
            fallbacks += 1
        m = _TENSOR.search(line)
        if not m:
            continue
        shape = [int(x) for x in m["shape"].split(",")]
        total += -(-tensor_bytes(m["new"] or m["cur"], shape) // alignment) * alignment
    return SizePrediction(total, fallbacks)
