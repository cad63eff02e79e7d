"""GGUF quantization types as llama.cpp names them."""

from __future__ import annotations

from functools import cache

# File types llama.cpp refuses to make without an importance matrix (llama-quant.cpp,
# tensor_requires_imatrix): their quality collapses without one.
NEEDS_IMATRIX = {"IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "Q2_K_S"}
# What llama.cpp's converter writes directly (--outtype); every other type is quantized from it.
INTERMEDIATES = {"F16": "f16", "BF16": "bf16", "Q8_0": "q8_0"}


@cache
def ftypes() -> dict[str, int]:
    """llama_ftype value of every quantization type the installed llama.cpp knows."""
    import llama_cpp

    prefix = "LLAMA_FTYPE_MOSTLY_"
    return {k[len(prefix):]: v for k, v in vars(llama_cpp).items() if k.startswith(prefix) and isinstance(v, int)}


@cache
def ggml_types() -> dict[str, int]:
    """ggml tensor type values (for per-tensor overrides); gguf-py's table is llama.cpp's own numbering."""
    from gguf import GGMLQuantizationType

    return {t.name: int(t.value) for t in GGMLQuantizationType if not t.name.startswith(("I8", "I16", "I32", "I64"))}


def normalize(name: str) -> str:
    return str(name).strip().upper().replace("-", "_")
