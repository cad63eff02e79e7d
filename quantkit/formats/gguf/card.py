"""What GGUF cards and reports say beyond the common table: what each type is for, the importance matrix."""

from __future__ import annotations

from ...fsutil import human_size
from ...report import public_text_name
from .imatrix import describe_idle

# What each llama.cpp type is for, as quant repos usually say it.
USE_HINTS = {
    "F32": "full precision; only for further conversion",
    "F16": "full quality reference; the largest file",
    "BF16": "full quality reference; the largest file",
    "Q8_0": "near-lossless; when memory allows",
    "Q6_K": "very close to the reference",
    "Q5_K_M": "high quality; recommended when it fits",
    "Q5_K_S": "high quality, a little smaller",
    "Q4_K_M": "the usual default: good quality for its size",
    "Q4_K_S": "a little smaller than Q4_K_M, a little worse",
    "IQ4_XS": "4-bit quality at a smaller size",
    "IQ4_NL": "4-bit; for runtimes without k-quant support",
    "IQ3_M": "small; better than Q3_K at its size with an imatrix",
    "IQ3_XXS": "very small; needs the imatrix it was made with to be good",
    "IQ2_M": "tiny; large quality loss",
    "Q3_K_L": "small; noticeable quality loss",
    "Q3_K_M": "small; noticeable quality loss",
    "Q3_K_S": "very small; large quality loss",
    "Q2_K": "smallest; large quality loss, for very constrained devices",
}


def imatrix_lines(artifacts: list[dict]) -> list[str]:
    """What the importance matrix is, how it was made, and which files used it."""
    lines = []
    for im in (a for a in artifacts if a.get("role") == "imatrix"):
        d = im.get("details") or {}
        users = [a["variant"] for a in artifacts if im["filename"] in (a.get("uses") or [])]
        lines.append(f"`{im['filename']}` ({human_size(im['size_bytes'])}) is the importance matrix, computed by "
                     f"llama.cpp's llama-imatrix on {d.get('chunks', '?')} chunks of {d.get('chunk_tokens', '?')} "
                     f"tokens of `{public_text_name(d.get('text', '?'))}` (calibration text, disjoint from the evaluation "
                     f"text). Quantized with it: {', '.join(users) or 'none'}; the others without."
                     + (f" Calibration routed no token to {describe_idle(idle)}: llama.cpp quantized those experts "
                        "without importance weights." if (idle := d.get("experts_without_data")) else ""))
    return lines
