"""The GGUF format's profile options (Options, read strictly by quantkit.options), checked and resolved into typed
variants (GGUFOptions).

    gguf:
      intermediate: auto           # auto (the default: bf16 for a bf16 source, else f16) | f16 | bf16 | q8_0
      split_max_size: 48G          # larger artifacts are written as llama.cpp shards
      imatrix: {text: builtin:botchan, chunks: 64, ctx: 512}   # compute an importance matrix
      # imatrix: {from: q8_0}     # ...from the ladder's Q8_0 file instead: half the memory of a 16-bit one
      types:
        - Q4_K_M                                             # a plain llama.cpp type
        - {type: Q4_K_M, name: Q4_K_L, embeddings: Q8_0, output: Q8_0}
        - {type: Q3_K_M, imatrix: false, name: Q3_K_M-noimat}
        - {type: Q4_K_M, overrides: {"ffn_down": Q6_K}}     # tensor-name regex -> type
        - {type: Q8_0, split_max_size: 100M}
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from ...errors import ProfileError
from ...evaluate.text import CALIBRATION
from ...fsutil import parse_bytes
from .types import INTERMEDIATES, NEEDS_IMATRIX, ftypes, ggml_types, normalize

DEFAULT_SPLIT = "48G"
IMATRIX_FROM = ("intermediate", "q8_0")


@dataclass(frozen=True)
class ImatrixEntry:
    """`imatrix:` as the profile writes it."""

    text: str = "builtin:botchan"
    chunks: int = 64
    ctx: int = 512
    from_: str = field(default="intermediate", metadata={"key": "from"})


@dataclass(frozen=True)
class TypeEntry:
    """One entry of `types:` written as a mapping (a plain entry is the type's name)."""

    type: str
    name: str | None = None
    imatrix: bool | None = None  # None: whether the backend has an importance matrix
    embeddings: str | None = None
    output: str | None = None
    overrides: dict[str, str] = field(default_factory=dict)
    split_max_size: str | int | None = None  # None: the backend's


@dataclass(frozen=True)
class Options:
    """The profile's `gguf:` mapping (see this module's docstring)."""

    types: list[str | TypeEntry] = field(default_factory=list)
    # auto: a bf16 source stays BF16. F16 cannot hold bf16's range: llama.cpp #12538, #18145 and #18182 are bf16
    # models whose F16 conversion overflowed or lost accuracy.
    intermediate: str = "auto"
    imatrix: bool | ImatrixEntry | None = None
    split_max_size: str | int = DEFAULT_SPLIT


@dataclass(frozen=True)
class ImatrixOptions:
    text: str = "builtin:botchan"  # calibration text; never the evaluation text
    chunks: int = 64  # chunks of `ctx` tokens fed through the model (llama-imatrix --chunks)
    ctx: int = 512
    # The file llama-imatrix runs: "intermediate", or the name of the ladder's plain Q8_0 variant. llama-imatrix
    # maps the whole file, so a Q8_0 one halves its memory (47 instead of 93 GB at Mixtral-8x7B); llama.cpp's
    # community does this for big models (llama.cpp issue #5153).
    model: str = "intermediate"

    def options(self) -> dict[str, Any]:
        """What the imatrix step depends on (part of its resume key; `model` only when it is not the default,
        so that imatrix steps planned before it existed keep their keys)."""
        opts = asdict(self)
        if self.model == "intermediate":
            del opts["model"]
        return opts


@dataclass(frozen=True)
class GGUFVariant:
    type: str  # llama.cpp file type: Q4_K_M
    name: str  # label and file name part: Q4_K_L
    imatrix: bool = False
    embeddings: str | None = None  # ggml type for token_embd.weight
    output: str | None = None  # ggml type for output.weight
    overrides: tuple[tuple[str, str], ...] = ()  # (tensor-name regex, ggml type), first match wins
    split_max_bytes: int = 0

    def options(self) -> dict[str, Any]:
        """What the quantize step depends on (part of its resume key)."""
        return {"type": self.type, "imatrix": self.imatrix, "embeddings": self.embeddings, "output": self.output,
                "overrides": [list(o) for o in self.overrides], "split_max_bytes": self.split_max_bytes}


@dataclass(frozen=True)
class GGUFOptions:
    intermediate: str  # F16 | BF16 | Q8_0
    variants: list[GGUFVariant] = field(default_factory=list)
    imatrix: ImatrixOptions | None = None  # None: no variant uses one
    split_max_bytes: int = 0


def parse_size(value: Any, where: str) -> int:
    """'48G', '100M', '1.5G' (decimal units, as llama.cpp's --split-max-size) or a byte count."""
    n = parse_bytes(value)
    if n is None:
        raise ProfileError(f"{where}: {value!r} is not a size", "write it like 48G, 500M or a number of bytes")
    if n < 1_000_000:
        raise ProfileError(f"{where}: {value!r} is below 1M", "llama.cpp's shards are sized in whole megabytes")
    return n


def parse_options(options: Options, source_dtype: str) -> GGUFOptions:
    inter = normalize(options.intermediate)
    if inter == "AUTO":
        inter = "BF16" if "bfloat16" in source_dtype else "F16"
    if inter not in INTERMEDIATES:
        raise ProfileError(f"gguf: intermediate {inter!r} is not supported", "use f16, bf16, q8_0 or auto")
    split = parse_size(options.split_max_size, "gguf.split_max_size")
    imatrix = _imatrix_options(options.imatrix) if options.imatrix not in (None, False) else None

    variants = [_variant(e, imatrix is not None, split) for e in options.types]
    variants = [v for v in variants if v.name != inter or v.type != inter]  # the intermediate is always made
    seen: dict[str, GGUFVariant] = {}
    for v in variants:
        if v.name in seen:
            raise ProfileError(f"gguf: two entries are named {v.name!r}", "give one of them its own `name:`")
        seen[v.name] = v
    if inter == "Q8_0" and variants:
        raise ProfileError("gguf: with intermediate q8_0 no other type can be made (llama.cpp does not requantize)",
                           "use intermediate f16 or bf16, or drop `types`")
    if any(v.imatrix for v in variants) and imatrix is None:
        imatrix = ImatrixOptions()
    if imatrix is not None and not any(v.imatrix for v in variants):
        imatrix = None  # asked for, but every entry opted out
    if imatrix is not None and imatrix.model == "q8_0":
        imatrix, variants = _imatrix_from_q8_0(imatrix, variants)
    return GGUFOptions(inter, variants, imatrix, split)


def _imatrix_from_q8_0(imatrix: ImatrixOptions, variants: list[GGUFVariant]):
    """The importance matrix computed from the ladder's plain Q8_0 file (no per-tensor types of its own, which
    would change what calibration sees). That file is made without one: llama.cpp's Q8_0 quantizer ignores
    importance weights (quantize_q8_0 in ggml-quants.c), so the file is the same and nothing depends on itself."""
    q8 = next((v for v in variants if v.type == "Q8_0" and not (v.overrides or v.embeddings or v.output)), None)
    if q8 is None:
        raise ProfileError("gguf.imatrix.from: q8_0 needs a plain Q8_0 entry in gguf.types to compute it from",
                           "add Q8_0 to gguf.types, or drop `from: q8_0` (the imatrix is then computed from the intermediate)")
    variants = [replace(v, imatrix=False) if v is q8 else v for v in variants]
    return replace(imatrix, model=q8.name), variants


def _imatrix_options(spec: bool | ImatrixEntry) -> ImatrixOptions:
    spec = ImatrixEntry() if spec is True else spec
    model = spec.from_.lower()
    if model not in IMATRIX_FROM:
        raise ProfileError(f"gguf.imatrix.from: {model!r} is not a file it can be computed from",
                           f"use one of: {', '.join(IMATRIX_FROM)}")
    opts = ImatrixOptions(text=spec.text, chunks=spec.chunks, ctx=spec.ctx, model=model)
    if opts.text.startswith("builtin:") and opts.text.split(":", 1)[1] not in CALIBRATION:
        raise ProfileError(f"gguf.imatrix.text: unknown built-in calibration text {opts.text!r}",
                           f"use one of: {', '.join('builtin:' + n for n in CALIBRATION)}, a text file or hf:ORG/DATASET")
    if opts.chunks <= 0 or opts.ctx < 64:
        raise ProfileError(f"gguf.imatrix: chunks must be > 0 and ctx >= 64, got {opts.chunks} and {opts.ctx}",
                           "fix the profile")
    return opts


def _variant(entry: str | TypeEntry, imatrix_default: bool, split_default: int) -> GGUFVariant:
    entry = TypeEntry(type=entry) if isinstance(entry, str) else entry
    t = normalize(entry.type)
    known = ftypes()
    if t not in known or t.startswith("GUESSED"):
        raise ProfileError(f"gguf: unknown quant type {t!r}",
                           "use one of: " + ", ".join(sorted(k for k in known if not k.startswith("GUESSED"))))
    name = entry.name or t
    if not re.fullmatch(r"[A-Za-z0-9_.+-]+", name):
        raise ProfileError(f"gguf: name {name!r} cannot be part of a file name", "use letters, digits, _ . + -")
    use_imatrix = imatrix_default if entry.imatrix is None else entry.imatrix
    if t in NEEDS_IMATRIX and not use_imatrix:
        raise ProfileError(f"gguf: {t} needs an importance matrix, and {name} has none",
                           "add `imatrix: {text: builtin:botchan}` to the gguf backend (or `imatrix: true` to this entry)")
    for pattern in entry.overrides:
        try:
            re.compile(pattern)
        except re.error as e:
            raise ProfileError(f"gguf: override pattern {pattern!r} of {name} is not a regular expression: {e}",
                               "fix the pattern") from e
    return GGUFVariant(
        type=t, name=name, imatrix=use_imatrix,
        embeddings=_tensor_type(entry.embeddings, name), output=_tensor_type(entry.output, name),
        overrides=tuple((str(p), _tensor_type(v, name)) for p, v in entry.overrides.items()),
        split_max_bytes=parse_size(entry.split_max_size, f"gguf: {name}.split_max_size")
        if entry.split_max_size is not None else split_default,
    )


def _tensor_type(value: Any, name: str) -> str | None:
    if value is None:
        return None
    t = normalize(value)
    if t not in ggml_types():
        raise ProfileError(f"gguf: {name}: unknown tensor type {value!r}",
                           "use a ggml tensor type: " + ", ".join(sorted(ggml_types())))
    return t
