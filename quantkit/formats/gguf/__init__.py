"""GGUF: llama.cpp's own converter to f16/bf16, an optional importance matrix (llama-imatrix), then
llama_model_quantize per variant, with per-tensor overrides, and llama.cpp shards for large files. Evaluated
by llama.cpp (runner), published as files on one repo's main."""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path
from typing import Any

from ...errors import SourceError
from ...evaluate.text import calibration_identity
from ...fsutil import atomic_dir, atomic_path, human_size
from .llamacpp import bindings_version, find_tool, find_tree, tool_version
from ...plan import ArtifactPlan
from ...results import Description, Measured
from ...procs import run_python
from ...source import Source
from ...memory import chat_kv_bytes, scored_logits
from ...evaluate.parity import Parity
from ..base import BuildContext, Evaluation, Format, Requirement, package
from .options import GGUFVariant, Options, parse_options
from .predict import peak_for_params, predict_sizes, quantize_spec, run_peak
from .shards import gguf_files, model_file, split
from .types import INTERMEDIATES
from .imatrix import compute_imatrix
from .runner import WINDOWS_PER_DECODE
from .card import GGUFCard

_TENSOR_LINE = re.compile(r"\[\s*(\d+)/\s*(\d+)\]")
_FALLBACK = re.compile(
    r"warning: (?P<tensor>\S+)\s+- ncols\s+(?P<ncols>\d+) not divisible by\s+(?P<block>\d+) "
    r"\(required for type\s+(?P<wanted>\S+)\)\s*(?:\(WARNING: must use F16 due to unusual shape\)\s*)?"
    r"-> falling back to\s+(?P<used>\S+)"
)


# Python and llama-cpp-python besides the memory-mapped file (its runtime size: ArtifactPlan.runtime_bytes, with
# the copies llama.cpp's CPU backend makes of some types), the KV cache and one window's compute buffers.
# Measured on the F16 files at 135M, 3B and 7B: 0.69, 6.43 and 15.08 GB.
GGUF_EVAL_FIXED = 300_000_000
# Each window scored in the same decode beyond the first (runner.WINDOWS_PER_DECODE): llama.cpp's
# logits of its scored half, twice (the output head's result and the copy it returns), and its activations.
# Fitted on the sample (vocabulary 49,152, hidden 576): 4 windows a decode measured 345 MB above 1 a decode.
_WINDOW_ACTIVATION_PER_HIDDEN = 40


class GGUFFormat(Format, name="gguf"):
    Options = Options
    evaluation = Evaluation("quantkit.formats.gguf.runner", fixed_bytes=GGUF_EVAL_FIXED,
                            windows_per_pass=WINDOWS_PER_DECODE)
    card = GGUFCard(display="GGUF", layout="files", tags=("llama.cpp",), featured=("Q4_K_M",),
                    loads_in="They load in llama.cpp, LM Studio, Ollama and anything else built on llama.cpp (a file "
                             "split in parts: not in Ollama).")

    def requirements(self) -> list[Requirement]:
        hint = "run ./scripts/setup.sh (it builds llama-cpp-python)"
        return [package("llama-cpp-python", "llama_cpp", hint), package("gguf", "gguf", hint)]

    def step_peak(self, params: int) -> int:
        return peak_for_params(params)

    def vocabulary(self) -> set[str]:
        from .types import ftypes, ggml_types

        return super().vocabulary() | set(ftypes()) | set(ggml_types()) | set(INTERMEDIATES) | {
            "llama_cpp", "llama-cpp", "k-quant", "k-quants", "i-quant", "i-quants", "imatrix", "convert_hf_to_gguf"}

    def validate(self, options: Options) -> None:
        parse_options(options, "float16")  # `intermediate: auto` resolves with the source's dtype, in plan()

    def plan(self, source: Source, options: Options, converter: str | None = None) -> list[ArtifactPlan]:
        opts = parse_options(options, source.dtype)
        tree = find_tree(converter)
        if source.architecture not in tree.supported_architectures():
            raise SourceError(
                f"architecture {source.architecture} is not supported by llama.cpp's converter ({tree.version})",
                "use a model whose architecture llama.cpp supports, or --llama-cpp with a newer llama.cpp checkout",
            )
        sizes = predict_sizes(source, tree, opts)
        if opts.imatrix:
            find_tool("llama-imatrix")  # missing tools fail now, not after the conversion
        inter = self._artifact(source, opts.intermediate, sizes.files[opts.intermediate], opts.split_max_bytes,
                               role="intermediate", peak=sizes.peak_convert)
        items = [inter]
        imatrix = None

        def variant(v: GGUFVariant, uses: tuple[str, ...] = ()) -> ArtifactPlan:
            return self._artifact(source, v.name, sizes.files[v.name], v.split_max_bytes, variant=v,
                                  depends_on=inter.filename, peak=sizes.peak_quantize, uses=uses)

        calibrated = None  # the ladder's Q8_0 when the imatrix is computed from it
        if opts.imatrix:
            q8 = next((v for v in opts.variants if v.name == opts.imatrix.model), None)
            if q8:
                calibrated = variant(q8)
                items.append(calibrated)  # a plan lists every artifact after its inputs
            runs = calibrated or inter
            imatrix = ArtifactPlan(
                backend=self.name, variant="imatrix", filename=f"{source.name}.imatrix.gguf", role="imatrix",
                predicted_bytes=sizes.imatrix_bytes, depends_on=runs.filename, options=opts.imatrix.options(),
                predicted_peak_bytes=run_peak(runs.predicted_bytes), predicted_mapped_bytes=runs.predicted_bytes,
                passes=opts.imatrix.chunks,
                note=f"{opts.imatrix.chunks} chunks of {opts.imatrix.text}",
            )
            items.append(imatrix)
        for v in opts.variants:
            if calibrated is None or v.name != calibrated.variant:
                items.append(variant(v, (imatrix.filename,) if v.imatrix and imatrix else ()))
        if any(i.role == "model" and i.options.get("split_max_bytes") for i in items):
            find_tool("llama-gguf-split")
        return items

    def _artifact(self, source: Source, name: str, size, limit: int, *, role: str = "model", peak: int = 0,
                  variant: GGUFVariant | None = None, depends_on: str | None = None, uses: tuple[str, ...] = ()):
        options = variant.options() if variant else {}
        notes = [f"{size.fallbacks} tensors fall back to other types"] if size.fallbacks else []
        if variant and variant.type != variant.name:
            notes.insert(0, variant.type)
        stem = f"{source.name}-{name}"
        filename = f"{stem}.gguf"
        if limit and size.file_bytes > limit:
            filename = stem  # a folder of llama.cpp shards
            options["split_max_bytes"] = limit
            notes.append(f"{math.ceil(size.file_bytes / limit)} shards of at most {human_size(limit)}")
        else:
            options.pop("split_max_bytes", None)  # the limit only matters to files it splits
        return ArtifactPlan(backend=self.name, variant=name, filename=filename, predicted_bytes=size.file_bytes,
                            role=role, depends_on=depends_on, uses=uses, options=options,
                            predicted_peak_bytes=peak, runtime_bytes=size.file_bytes + size.repacked_bytes,
                            note="; ".join(notes))

    def build(self, item: ArtifactPlan, context: BuildContext) -> dict[str, Any]:
        out = context.out_dir / item.filename
        if item.role == "intermediate":
            return self._convert(item, context, out)
        src = model_file(context.out_dir / item.depends_on)
        if item.role == "imatrix":
            return compute_imatrix(src, out, item.options, context)
        return self._quantize(item, context, src, out)

    def _convert(self, item: ArtifactPlan, context: BuildContext, out: Path) -> dict[str, Any]:
        tree = find_tree(context.converter)
        args = [str(tree.converter), str(context.source.path), "--outtype", INTERMEDIATES[item.variant]]
        if context.source.repo_id:
            args += ["--model-name", context.source.name]
        limit = item.options.get("split_max_bytes")
        if limit:
            args += ["--split-max-size", f"{max(1, limit // 1_000_000)}M"]
        with context.reporter.step(f"convert to {item.filename}", total=100) as step, \
                (atomic_dir(out) if limit else atomic_path(out)) as tmp:
            def on_line(line: str) -> None:
                m = re.search(r"Writing:\s+(\d+)%", line)
                if m:
                    step.update(int(m.group(1)))

            target = tmp / f"{out.name}.gguf" if limit else tmp  # shards are named after it: NAME-00001-of-0000N.gguf
            done = run_python(args + ["--outfile", str(target)], on_line=on_line, cwd=tree.root, what="llama.cpp converter")
        return done.memory()

    def _quantize(self, item: ArtifactPlan, context: BuildContext, src: Path, out: Path) -> dict[str, Any]:
        limit = item.options.get("split_max_bytes")
        imatrix = context.out_dir / item.uses[0] if item.uses else None
        with context.reporter.step(f"quantize {item.filename}") as step, \
                (atomic_dir(out) if limit else atomic_path(out)) as tmp:
            def on_line(line: str) -> None:
                m = _TENSOR_LINE.search(line)
                if m:
                    step.update(int(m.group(1)), int(m.group(2)))

            whole = tmp / f"{out.name}.whole.gguf" if limit else tmp
            spec = quantize_spec(item.options, src, whole, context.threads, imatrix=imatrix)
            done = run_python(["-m", "quantkit.formats.gguf.quantize_tool", json.dumps(spec)],
                              on_line=on_line, what=f"llama.cpp quantizer ({item.variant})")
            if limit:
                step.update(0, None, note="splitting into shards")
                split(whole, tmp, out.name, limit)
                whole.unlink()
        # The quantizer's own log is the only record of which tensors could not take the asked type.
        return {"fallbacks": [m.groupdict() for line in done.lines if (m := _FALLBACK.search(line))],
                **done.memory()}

    def tools(self, item: ArtifactPlan, context: BuildContext) -> dict[str, str]:
        if item.role == "intermediate":
            return {"convert_hf_to_gguf.py": find_tree(context.converter).identity()}
        if item.role == "imatrix":
            return {"llama-imatrix": tool_version("llama-imatrix")}
        # The quantizer is the bindings' llama_model_quantize; shards are cut by llama-gguf-split.
        split = {"llama-gguf-split": tool_version("llama-gguf-split")} if item.options.get("split_max_bytes") else {}
        return {"llama-cpp-python": bindings_version(), **split}

    def inputs(self, item: ArtifactPlan, context: BuildContext) -> dict[str, str]:
        return calibration_identity(item.options["text"], context.evaluation_text) if item.role == "imatrix" else {}

    def describe(self, item: ArtifactPlan, path: Path, facts: dict[str, Any]) -> Description:
        from gguf import GGUFReader

        types: Counter[str] = Counter()
        n_bytes = n_elements = 0
        for f in gguf_files(path):
            for t in GGUFReader(f).tensors:
                types[t.tensor_type.name] += 1
                n_bytes += int(t.n_bytes)
                n_elements += int(t.n_elements)
        return Description(
            size_bytes=sum(f.stat().st_size for f in gguf_files(path)),
            bits_per_weight=round(n_bytes * 8 / max(n_elements, 1), 3) if item.role != "imatrix" else 0.0,
            tensor_types=dict(sorted(types.items())), fallbacks=facts.get("fallbacks", []),
            details={k: facts[k] for k in ("chunks", "chunk_tokens", "text", "experts_without_data") if facts.get(k)}
            | ({"shards": [f.name for f in gguf_files(path)]} if path.is_dir() else {}),
        )

    def evaluation_peak(self, artifact_bytes: int, vocab: int, window: int, config: dict[str, Any] | None,
                        item: ArtifactPlan | None = None) -> int:
        # llama.cpp allocates the chat turns' KV cache up front.
        hidden = int((config or {}).get("hidden_size") or 0)
        windows = (WINDOWS_PER_DECODE - 1) * window * (vocab * 4 + _WINDOW_ACTIVATION_PER_HIDDEN * hidden)
        return (self.evaluation.fixed_bytes + artifact_bytes + scored_logits(vocab, window) + windows
                + (chat_kv_bytes(config) if config is not None else 0))

    def evaluation_mapped(self, item: ArtifactPlan) -> int:
        return item.predicted_bytes  # llama.cpp maps the file; only the types its CPU backend repacks are copies

    def engine_identity(self) -> str:
        return "llama-server " + tool_version("llama-server")

    def engine_check(self, path: Path, source, call: dict | None, threads: int, template_file: Path | None = None):
        from .engine_checks import check_file

        return check_file(path, source, call, threads, self.engine_identity(), template_file)

    def retemplate(self, path: Path, template_file: Path, token_ids: dict[str, int],
                   tokenizer_files: dict[str, bytes]) -> None:
        from .metadata import rewrite_metadata

        rewrite_metadata(model_file(path), template_file=template_file, token_ids=token_ids)  # a split file's metadata is in its first shard

    def chat_facts(self, path: Path):
        from .chat_facts import gguf_facts

        return gguf_facts(path)

    def parity(self, artifact: Measured) -> Parity | None:
        # llama.cpp on the unquantized (F16/BF16) file, which every build evaluates anyway.
        e = artifact.evaluation
        if artifact.role != "intermediate" or artifact.variant not in ("F16", "BF16") or e is None or e.kld_mean is None:
            return None
        return Parity.of(f"llama.cpp, {artifact.variant} GGUF", vars(e))
