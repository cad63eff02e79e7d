"""GGUF quantization types as llama.cpp names them, and rough sizes for planning."""

from __future__ import annotations

from functools import cache

# Average bits per weight of each llama.cpp file type on a typical 7B Llama, used only to
# predict sizes before the f16 file exists (the quantizer's dry run gives exact sizes later).
NOMINAL_BPW = {
    "F32": 32.0, "F16": 16.0, "BF16": 16.0, "Q8_0": 8.5, "Q6_K": 6.56, "Q5_K_M": 5.69, "Q5_K_S": 5.54,
    "Q5_1": 6.0, "Q5_0": 5.5, "Q4_K_M": 4.89, "Q4_K_S": 4.58, "Q4_1": 5.0, "Q4_0": 4.5, "Q3_K_L": 4.27,
    "Q3_K_M": 3.91, "Q3_K_S": 3.5, "Q2_K": 3.0, "Q2_K_S": 2.9, "IQ4_XS": 4.25, "IQ4_NL": 4.5,
    "IQ3_M": 3.7, "IQ3_S": 3.44, "IQ3_XS": 3.3, "IQ3_XXS": 3.06, "IQ2_M": 2.7, "IQ2_S": 2.5,
    "IQ2_XS": 2.31, "IQ2_XXS": 2.06, "IQ1_M": 1.75, "IQ1_S": 1.56, "TQ1_0": 1.69, "TQ2_0": 2.06,
}
# Types whose quality collapses without an importance matrix; llama.cpp refuses them without one.
NEEDS_IMATRIX = {"IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S"}
INTERMEDIATES = {"F16": "f16", "BF16": "bf16"}


@cache
def ftypes() -> dict[str, int]:
    """llama_ftype value of every quantization type the installed llama.cpp knows."""
    import llama_cpp

    prefix = "LLAMA_FTYPE_MOSTLY_"
    return {k[len(prefix):]: v for k, v in vars(llama_cpp).items() if k.startswith(prefix) and isinstance(v, int)}


def normalize(name: str) -> str:
    return str(name).strip().upper().replace("-", "_")
