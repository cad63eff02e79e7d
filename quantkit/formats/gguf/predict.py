"""What a GGUF build will write, before it runs: exact file sizes and how many tensors fall back.

The converter writes a skeleton of the intermediate file (gguf_skeleton: real metadata and tensor
list, no data; its vocabulary stage is also the plan's check of the tokenizer: pretokenizer.py), and the quantizer's dry run picks every tensor's type for each variant, overrides
included. The result is cached per source files (by content: fsutil.file_identity, so a fresh download of
the same commit reuses it), options and llama.cpp version, so re-planning a build is instant.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ...errors import ToolError
from ...fsutil import file_identity, sha256_text, write_json_atomic
from .llamacpp import LlamaCppTree
from ...paths import cache_dir
from ...procs import run_python
from ...source import Source
from .options import GGUFOptions
from .pretokenizer import PreTokenizerWatch
from .sizes import SizePrediction, predict_from_dry_run
from .types import INTERMEDIATES, ftypes, ggml_types

# Peak memory of a step: a fixed part (Python, torch, llama.cpp) plus working copies of the largest
# tensor, because the converter and the quantizer stream tensors one at a time (lazy tensors,
# memory-mapped input) instead of loading the model. Fitted to the child process's peak RSS at three
# sizes (largest tensor 28.3M, 151M and 201M values): converter 0.94, 1.11 and 1.16 GB; quantizer
# 0.27, 1.09-1.13 and 1.44-1.49 GB (docs/benchmarks.md, "Scale"). llama-imatrix holds the whole
# intermediate model (519 MB for the sample's 271 MB file). RSS also counts pages of the
# memory-mapped input, which the kernel can drop under pressure.
_FIXED = {"convert": 900_000_000, "quantize": 80_000_000, "run": 250_000_000}
_PER_LARGEST_VALUE = {"convert": 1.5, "quantize": 7}
# A MoE's experts are converted as one stacked tensor a layer ([experts, out, in]): the converter holds each
# expert's float32 copy and the stack. Measured at Mixtral-8x7B's dimensions (470M values a stack, 2 layers):
# 4.57 GB peak, 4.21 GB of it anonymous, where the dense rate predicted 1.60 GB (docs/benchmarks.md).
_CONVERT_PER_EXPERT_STACK_VALUE = 7.5
_VERSION = 5  # bump when what is cached changes


@dataclass
class SizePlan:
    files: dict[str, SizePrediction] = field(default_factory=dict)  # variant name -> prediction
    imatrix_bytes: int = 0
    peak_convert: int = 0
    peak_quantize: int = 0
    peak_run: int = 0  # llama-imatrix: the whole intermediate file mapped, plus activations


def peak_for_params(params: int) -> int:
    """The heaviest GGUF step when only the parameter count is known: llama-imatrix holding a 16-bit model."""
    return _FIXED["run"] + 2 * params


def run_peak(file_bytes: int) -> int:
    """llama-imatrix's peak: it maps the whole file it runs."""
    return _FIXED["run"] + file_bytes


def quantize_spec(options: dict[str, Any], src: Path, dst: Path, threads: int, *, imatrix: Path | None = None,
                  dry_run: bool = False) -> dict[str, Any]:
    """The quantize tool's spec for one variant's options (GGUFVariant.options())."""
    types = ggml_types()
    spec: dict[str, Any] = {"src": str(src), "dst": str(dst), "ftype": ftypes()[options["type"]], "threads": threads,
                            "dry_run": dry_run, "overrides": [[p, types[t]] for p, t in options.get("overrides", [])]}
    for key in ("embeddings", "output"):
        if options.get(key):
            spec[key] = types[options[key]]
    if dry_run:
        spec["assume_imatrix"] = bool(options.get("imatrix"))
    elif imatrix is not None:
        spec["imatrix"] = str(imatrix)
        # What llama.cpp's quantize tool records, so runtimes and readers can tell an imatrix quant.
        spec["metadata"] = {"quantize.imatrix.file": imatrix.name}
    return spec


def predict_sizes(source: Source, tree: LlamaCppTree, opts: GGUFOptions) -> SizePlan:
    files = sorted(p for p in source.path.iterdir() if p.is_file() and not p.name.startswith("."))
    key = sha256_text("gguf-sizes", str(_VERSION), tree.version, str(tree.root), opts.intermediate,
                      *(file_identity(p) for p in files),
                      json.dumps([v.options() for v in opts.variants], sort_keys=True),
                      # Whether there is an importance matrix changes the sizes; which text it is made from does not.
                      str(bool(opts.imatrix)))
    cached = cache_dir() / "sizes" / f"{key[:32]}.json"
    if cached.exists():
        data = json.loads(cached.read_text())
        data["files"] = {k: SizePrediction(**v) for k, v in data["files"].items()}
        return SizePlan(**data)
    plan = _predict(source, tree, opts)
    cached.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(cached, {**asdict(plan), "files": {k: asdict(v) for k, v in plan.files.items()}})
    return plan


def _predict(source: Source, tree: LlamaCppTree, opts: GGUFOptions) -> SizePlan:
    from gguf import GGUFReader

    cache_dir().mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir(), prefix=".skeleton-") as tmp:
        skeleton = Path(tmp) / "skeleton.gguf"
        watch = PreTokenizerWatch()
        try:
            run_python(["-m", "quantkit.formats.gguf.skeleton", str(tree.root), str(source.path),
                        "--outtype", INTERMEDIATES[opts.intermediate], "--outfile", str(skeleton)],
                       on_line=watch, what="llama.cpp converter (planning sizes)")
        except ToolError as e:  # the converter's vocabulary stage ran: an unknown tokenizer is refused here
            if (refusal := watch.error(source.name, tree)) is None:
                raise
            raise refusal from e
        tensors = list(GGUFReader(skeleton).tensors)
        plan = SizePlan(files={opts.intermediate: SizePrediction(skeleton.stat().st_size)})
        if opts.variants:
            specs = [quantize_spec(v.options(), skeleton, Path(tmp) / "dry.gguf", 1, dry_run=True) for v in opts.variants]
            lines = run_python(["-m", "quantkit.formats.gguf.quantize_tool", json.dumps(specs)],
                               what="llama.cpp quantizer (dry run)").lines
            chunks = _per_spec(lines)
            for v, chunk in zip(opts.variants, chunks):
                plan.files[v.name] = predict_from_dry_run(skeleton, chunk)
        largest = max(int(t.n_elements) for t in tensors)
        stack = max((int(t.n_elements) for t in tensors if len(t.shape) > 2), default=0)
        plan.peak_convert = int(_FIXED["convert"] + max(_PER_LARGEST_VALUE["convert"] * largest,
                                                        _CONVERT_PER_EXPERT_STACK_VALUE * stack))
        plan.peak_quantize = int(_FIXED["quantize"] + _PER_LARGEST_VALUE["quantize"] * largest)
        plan.peak_run = run_peak(skeleton.stat().st_size)
        plan.imatrix_bytes = _imatrix_bytes(tensors)
    return plan


def _per_spec(lines: list[str]) -> list[list[str]]:
    chunks: list[list[str]] = []
    for line in lines:
        if line.startswith("=== spec "):
            chunks.append([])
        elif chunks:
            chunks[-1].append(line)
    return chunks


def _imatrix_bytes(tensors) -> int:
    """Size of llama-imatrix's GGUF: for each matrix a matmul multiplies activations with (the layers'
    weights; not the embeddings, not the output head), an f32 sum per input column (NAME.in_sum2)
    and an f32 token count (NAME.counts), each tensor's data padded to 32 bytes."""
    def info(name: str, dims: int) -> int:  # name string, dims, shape, type, offset
        return 8 + len(name) + 4 + 8 * dims + 4 + 8

    def padded(n: int) -> int:
        return -(-n // 32) * 32

    header, data = 400, 0  # GGUF header and the general.type / imatrix.* keys
    for t in tensors:
        if t.name.startswith("blk.") and len(t.shape) >= 2:
            experts = int(t.shape[2]) if len(t.shape) > 2 else 1
            dims = 1 if experts == 1 else 2
            header += info(t.name + ".in_sum2", dims) + info(t.name + ".counts", 1)
            data += padded(4 * int(t.shape[0]) * experts) + padded(4 * experts)
    return padded(header) + data
