"""GGUF backend: llama.cpp's own converter to f16/bf16, then llama_model_quantize per type."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any

from ..errors import ProfileError, SourceError
from ..fsutil import atomic_path
from ..llamacpp import find_tree
from ..plan import ArtifactPlan, ArtifactResult
from ..procs import run_python
from ..source import Source, param_count
from . import Backend, BuildContext, Requirement, package
from .gguf_types import INTERMEDIATES, NEEDS_IMATRIX, NOMINAL_BPW, ftypes, normalize

_TENSOR_LINE = re.compile(r"\[\s*(\d+)/\s*(\d+)\]")
_FALLBACK = re.compile(
    r"warning: (?P<tensor>\S+)\s+- ncols\s+(?P<ncols>\d+) not divisible by\s+(?P<block>\d+) "
    r"\(required for type\s+(?P<wanted>\S+)\)\s*(?:\(WARNING: must use F16 due to unusual shape\)\s*)?"
    r"-> falling back to\s+(?P<used>\S+)"
)


class GGUFBackend(Backend):
    name = "gguf"
    evaluator = "gguf"

    def requirements(self) -> list[Requirement]:
        hint = "run ./scripts/setup.sh (it builds llama-cpp-python)"
        return [package("llama-cpp-python", "llama_cpp", hint), package("gguf", "gguf", hint)]

    def plan(self, source: Source, options: dict[str, Any], ctx_llama_cpp: str | None = None) -> list[ArtifactPlan]:
        unknown = set(options) - {"types", "intermediate"}
        if unknown:
            raise ProfileError(f"gguf: unknown option(s) {sorted(unknown)}", "allowed: types, intermediate")
        tree = find_tree(ctx_llama_cpp)
        if source.architecture not in tree.supported_architectures():
            raise SourceError(
                f"architecture {source.architecture} is not supported by llama.cpp's converter ({tree.version})",
                "use a model whose architecture llama.cpp supports, or --llama-cpp with a newer llama.cpp checkout",
            )
        inter = normalize(options.get("intermediate", "f16"))
        if inter == "AUTO":
            inter = "BF16" if "bfloat16" in source.dtype else "F16"
        if inter not in INTERMEDIATES:
            raise ProfileError(f"gguf: intermediate {inter!r} is not supported", "use f16, bf16 or auto")
        known = ftypes()
        types = [normalize(t) for t in options.get("types", [])]
        for t in types:
            if t not in known or t.startswith("GUESSED"):
                raise ProfileError(
                    f"gguf: unknown quant type {t!r}",
                    "use one of: " + ", ".join(sorted(k for k in known if not k.startswith("GUESSED"))),
                )
            if t in NEEDS_IMATRIX:
                raise ProfileError(f"gguf: {t} needs an importance matrix, which this profile does not make",
                                   "pick a type of 3 bits or more, e.g. Q3_K_M or IQ4_XS")
        params = param_count(source.path)
        ref = ArtifactPlan(
            backend=self.name, variant=inter, filename=f"{source.name}-{inter}.gguf",
            predicted_bytes=_predict(params, inter), is_reference=True,
        )
        items = [ref]
        for t in dict.fromkeys(types):
            if t == inter:
                continue
            items.append(ArtifactPlan(
                backend=self.name, variant=t, filename=f"{source.name}-{t}.gguf",
                predicted_bytes=_predict(params, t), depends_on=ref.filename,
            ))
        return items

    def build(self, item: ArtifactPlan, ctx: BuildContext) -> dict[str, Any]:
        out = ctx.out_dir / item.filename
        if item.depends_on is None:
            return self._convert(item, ctx, out)
        return self._quantize(item, ctx, ctx.out_dir / item.depends_on, out)

    def _convert(self, item: ArtifactPlan, ctx: BuildContext, out: Path) -> dict[str, Any]:
        tree = find_tree(ctx.llama_cpp)
        args = [str(tree.converter), str(ctx.source.path), "--outtype", INTERMEDIATES[item.variant]]
        if ctx.source.repo_id:
            args += ["--model-name", ctx.source.name]
        with ctx.reporter.step(f"convert to {item.filename}", total=100) as step, atomic_path(out) as tmp:
            def on_line(line: str) -> None:
                m = re.search(r"Writing:\s+(\d+)%", line)
                if m:
                    step.update(int(m.group(1)))

            run_python(args + ["--outfile", str(tmp)], on_line=on_line, cwd=tree.root, what="llama.cpp converter")
        return {}

    def _quantize(self, item: ArtifactPlan, ctx: BuildContext, src: Path, out: Path) -> dict[str, Any]:
        ftype = ftypes()[item.variant]
        with ctx.reporter.step(f"quantize {item.filename}") as step, atomic_path(out) as tmp:
            def on_line(line: str) -> None:
                m = _TENSOR_LINE.search(line)
                if m:
                    step.update(int(m.group(1)), int(m.group(2)))

            lines = run_python(
                ["-m", "quantkit.backends.gguf_quantize_worker", str(src), str(tmp), str(ftype), str(ctx.threads)],
                on_line=on_line, what=f"llama.cpp quantizer ({item.variant})",
            )
        # The quantizer's own log is the only record of which tensors could not take the asked type.
        return {"fallbacks": [m.groupdict() for line in lines if (m := _FALLBACK.search(line))]}

    def describe(self, item: ArtifactPlan, path: Path, facts: dict[str, Any]) -> ArtifactResult:
        from gguf import GGUFReader

        reader = GGUFReader(path)
        types = Counter(t.tensor_type.name for t in reader.tensors)
        n_bytes = sum(int(t.n_bytes) for t in reader.tensors)
        n_elements = sum(int(t.n_elements) for t in reader.tensors)
        return ArtifactResult(
            backend=self.name, variant=item.variant, filename=item.filename,
            size_bytes=path.stat().st_size, sha256="",
            bits_per_weight=round(n_bytes * 8 / max(n_elements, 1), 3),
            tensor_types=dict(sorted(types.items())), fallbacks=facts.get("fallbacks", []),
        )


def _predict(params: int, variant: str) -> int:
    return int(params * NOMINAL_BPW.get(variant, 16.0) / 8) + 8 * 1024 * 1024  # + metadata and vocab
