"""EXL2: exllamav2's own converter. One measurement pass per model (measurement.json, an
artifact of its own), reused by every bitrate; each bitrate is a folder, published as a branch
(`4.0bpw-h6`). exllamav2 needs a CUDA GPU: without one the plan refuses, or skips EXL2 when the
profile says `if_unavailable: skip`. exllamav2 is never imported in this process (on import it
compiles its CUDA extension); its work runs in child processes."""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from ...errors import ProfileError, ToolError
from ...evaluate.text import calibration_identity, calibration_text
from ...fsutil import atomic_path, drop_local_paths, partial_path, sha256_text, write_text_atomic
from ...plan import ArtifactPlan
from ...results import Description, Judged
from ...procs import Finished, run_python
from ...source import Source, param_count, tensor_stats
from ...gpus import cuda_devices
from ...memory import scored_logits
from ..base import BuildContext, Card, Evaluation, Format, Requirement, package, versions, weight_facts
from ...evaluate.parity import Parity
from ...config_view import source_view

INSTALL_HINT = "install the exl2 extra: QUANTKIT_EXTRAS=test,gptq,exl2 ./scripts/setup.sh (or pip install 'quantkit[exl2]')"
# Bits a quantized decoder-layer weight takes beyond the asked rate (scales, permutations, the mix of
# bit widths the optimizer picks). From the sample on an H100 (issue 14): 3.0 bpw -> 123.1 MB and
# 4.0 bpw -> 136.4 MB, with the fp16 embedding, the 6-bit head (6.25 bits with its scales) and the
# copied tokenizer files counted apart. Two points of one model: to be checked on a GPU at 6.0 and 8.0 bpw.
_LAYER_OVERHEAD_BITS = 0.07


# Every process that runs exllamav2 (its converter, the preflight, the evaluation) gets this: exllamav2 0.3.2 without
# flash-attn or xformers takes torch's SDPA path, which has no causal mask outside packed batches (attn.py,
# _attn_torch), so a position sees the later tokens of its window; the matmul path it selects masks them. Part of
# every EXL2 resume key (inputs) and evaluation key (Evaluation.env): files made or scored without it are remade.
CHILD_ENV = {"EXLLAMA_NO_SDPA": "1"}

# EXL2 runs on the GPU; the host holds exllamav2, torch and the file it reads from. Not measured yet (no
# GPU machine): an allowance, not a fit.
EXL2_EVAL_FIXED = 1_500_000_000


class EXL2Card(Card):
    def usage(self, repo_id: str, local_dir: str, artifact: Judged) -> list[str]:
        return ["With TabbyAPI, put the downloaded folder in its `models/` folder; with exllamav2:", "",
                "```python", "from exllamav2 import ExLlamaV2, ExLlamaV2Cache, ExLlamaV2Config", "",
                f'config = ExLlamaV2Config("{local_dir}")',
                "model = ExLlamaV2(config)", "model.load_autosplit(ExLlamaV2Cache(model, lazy=True))", "```"]


@dataclass(frozen=True)
class Rate:
    """An entry of `bits` with a head width of its own: releases put an 8-bit head on 8.0 bpw."""

    bits: float
    head_bits: int | None = None  # None: the format's head_bits


@dataclass(frozen=True)
class Calibration:
    text: str = "builtin:botchan"  # never the evaluation text
    rows: int = 100
    length: int = 2048


@dataclass(frozen=True)
class Measurement:
    rows: int = 16
    length: int = 2048


@dataclass(frozen=True)
class Options:
    """The profile's `exl2:` mapping:

        exl2:
          bits: [3.0, 4.0, 5.0, 6.0, {bits: 8.0, head_bits: 8}]
          head_bits: 6
          calibration: {text: builtin:botchan, rows: 100, length: 2048}
          measurement: {rows: 16, length: 2048}
    """

    bits: list[float | Rate] = field(default_factory=lambda: [3.0, 4.0, 5.0, 6.0, 8.0])
    head_bits: int = 6
    calibration: Calibration = Calibration()
    measurement: Measurement = Measurement()


class EXL2Format(Format, name="exl2"):
    Options = Options
    builds_together = True  # the ladder's bitrates in one exllamav2 process (ladder.py)
    evaluation = Evaluation("quantkit.formats.exl2.runner", fixed_bytes=EXL2_EVAL_FIXED, gpus=1, env=CHILD_ENV)
    gpus = 1
    card = EXL2Card(display="exl2", made_with="exllamav2's converter", featured=("4.0bpw-h6",),
                    loads_in="They load in exllamav2 and TabbyAPI.")

    def requirements(self) -> list[Requirement]:
        return [package("exllamav2", "exllamav2", INSTALL_HINT),
                Requirement("a CUDA GPU", cuda_devices() > 0,
                            "EXL2 needs a CUDA GPU; run on a machine with one, or set `if_unavailable: skip` "
                            "under exl2 in the profile to build the other formats without it", gpu=True)]

    def validate(self, options: Options) -> None:
        self._variants(options)

    def vocabulary(self) -> set[str]:
        return super().vocabulary() | {"exllamav2", "TabbyAPI"}

    @staticmethod
    def _variants(options: Options) -> list[tuple[float, int]]:
        """(bits, head_bits) of each bitrate, sorted."""
        if not options.bits:
            raise ProfileError("exl2.bits must list bits per weight", "e.g. bits: [4.0, 6.0]")
        variants = set()
        for entry in options.bits:
            b, h = (entry.bits, entry.head_bits) if isinstance(entry, Rate) else (entry, None)
            h = options.head_bits if h is None else h
            if not 2.0 <= b <= 8.0:
                raise ProfileError(f"exl2: {b!r} bits per weight is out of range", "use values from 2.0 to 8.0")
            if h not in (6, 8):
                raise ProfileError(f"exl2: head_bits {h!r} is not supported", "use 6 or 8")
            variants.add((float(b), h))
        return sorted(variants)

    def plan(self, source: Source, options: Options, converter: str | None = None) -> list[ArtifactPlan]:
        variants, calib, measure = self._variants(options), asdict(options.calibration), asdict(options.measurement)
        stats = tensor_stats(source.path)
        # A tied head is quantized as a copy of the embedding.
        params, embed, head_values, linear = stats.params, stats.embedding, stats.head or stats.embedding, stats.linear
        measurement = ArtifactPlan(
            backend=self.name, variant="measurement", filename=f"{source.name}-exl2-measurement.json",
            role="measurement", predicted_bytes=200_000, options={"calibration": {"text": calib["text"]}, **measure},
            predicted_peak_bytes=2 * 2 * params, note="exllamav2's measurement pass, shared by every bitrate",
        )
        items = [measurement]
        for b, head in variants:
            variant = f"{b:.1f}bpw-h{head}"
            items.append(ArtifactPlan(
                backend=self.name, variant=variant, filename=f"{source.name}-exl2-{variant}",
                # The embedding stays fp16; the head is quantized at head_bits (a copy of the embedding when they
                # are tied); the decoder layers at the asked rate; norms and the rest in fp16.
                predicted_bytes=int(embed * 2 + head_values * (head + 0.25) / 8 + linear * (b + _LAYER_OVERHEAD_BITS) / 8
                                    + (params - embed - linear - (head_values if head_values != embed else 0)) * 2
                                    + _other_files(source)),
                depends_on=measurement.filename,
                options={"bits": b, "head_bits": head, "calibration": calib}, predicted_peak_bytes=2 * 2 * params,
            ))
        return items

    def build(self, item: ArtifactPlan, context: BuildContext) -> dict[str, Any]:
        [(_, facts)] = self.build_many([item], context)
        return facts

    def build_many(self, items: list[ArtifactPlan], context: BuildContext) -> Iterator[tuple[ArtifactPlan, dict[str, Any]]]:
        """The measurement (alone: every bitrate reads it), or the bitrates of the ladder in one process
        (ladder.py), each folder renamed into place as soon as the process is done, the finished ones even when
        another failed."""
        state = context.out_dir / ".quantkit"
        view = source_view(context.source.path, state / "exl2-source")  # config.json as exllamav2 reads it
        parquet = self._calibration_parquet(items[0].options["calibration"]["text"], context)
        common = ["-i", str(view), "-nr", "-c", str(parquet)]
        for item in (i for i in items if i.role == "measurement"):
            yield item, self._measure(item, view, common, context)
        rates = [i for i in items if i.role != "measurement"]
        if rates:
            yield from self._ladder(rates, common, context)

    def _measure(self, item: ArtifactPlan, view: Path, common: list[str], context: BuildContext) -> dict[str, Any]:
        with context.reporter.step(f"exl2 {item.variant} (exllamav2)") as step:
            parity = self._preflight(view, context)
            with atomic_path(context.out_dir / item.filename) as tmp:
                done = run_python(["-m", "exllamav2.conversion.convert_exl2", *common,
                                   "-o", str(context.out_dir / ".quantkit" / "exl2-work-measurement"),
                                   "-om", str(tmp), "-mr", str(item.options["rows"]), "-ml", str(item.options["length"])],
                                  env=CHILD_ENV, what="exllamav2 (measurement)")
                _check(done, tmp)
                drop_local_paths(tmp)
            step.update(1, 1)
        return {"parity": parity, **done.memory(), "source_params": param_count(context.source.path)}

    def _ladder(self, items: list[ArtifactPlan], common: list[str],
                context: BuildContext) -> Iterator[tuple[ArtifactPlan, dict[str, Any]]]:
        state = context.out_dir / ".quantkit"
        folders = {i.variant: partial_path(context.out_dir / i.filename) for i in items}
        rates = []
        for item in items:
            cal, folder = item.options["calibration"], folders[item.variant]
            shutil.rmtree(folder, ignore_errors=True)
            rates.append({"variant": item.variant, "folder": str(folder), "args": [
                *common, "-o", str(state / f"exl2-work-{item.variant}"), "-m", str(context.out_dir / item.depends_on),
                "-cf", str(folder), "-b", str(item.options["bits"]), "-hb", str(item.options["head_bits"]),
                "-r", str(cal["rows"]), "-l", str(cal["length"])]})
        spec = state / "exl2-ladder.json"
        write_text_atomic(spec, json.dumps({"rates": rates}, indent=1))
        seconds: dict[str, float] = {}
        failures: dict[str, str] = {}
        said: list[str] = []  # exllamav2's " ## Error" lines since the last bitrate ended (it exits 0 after them)
        label = f"exl2 {', '.join(i.variant for i in items)} (exllamav2, one process)"
        with context.reporter.step(label) as step:
            def on_line(line: str) -> None:
                if line.lstrip().startswith("##"):
                    said.append(line.strip())
                if m := _LADDER_LINE.match(line):
                    variant, outcome = m.group(1), m.group(2)
                    if variant == "loaded":
                        context.reporter.info(f"exllamav2 loaded in {outcome.split()[-2]} s")
                    elif outcome.startswith("done in"):
                        seconds[variant] = float(outcome.split()[-2])
                    else:
                        failures[variant] = outcome.removeprefix("failed: ") + (f" ({said[-1]})" if said else "")
                    said.clear()
                    step.update(len(seconds) + len(failures), len(items))

            error, memory = None, {}
            try:
                memory = run_python(["-m", "quantkit.formats.exl2.ladder", str(spec)], on_line=on_line, env=CHILD_ENV,
                                    what="exllamav2 (the EXL2 ladder)").memory()
            except ToolError as e:  # the bitrates that finished before it are kept all the same
                error = e
        for item in items:
            folder = folders[item.variant]
            if item.variant in seconds and (folder / "config.json").exists():
                drop_local_paths(folder / "config.json")  # quantization_config names the calibration file
                final = context.out_dir / item.filename
                shutil.rmtree(final, ignore_errors=True)
                os.replace(folder, final)
                # One process made them all: its peak memory stands for each (the heaviest bitrate's).
                yield item, {**memory, "seconds": seconds[item.variant], "source_params": param_count(context.source.path)}
            else:
                shutil.rmtree(folder, ignore_errors=True)
        missing = [i.variant for i in items if i.variant not in seconds]
        if missing:
            why = "; ".join(f"{v}: {failures[v]}" for v in missing if v in failures) or str(error or "no reason given")
            raise ToolError(f"exllamav2 did not make {', '.join(missing)} ({why})",
                            error.hint if error else "see exllamav2's output above")

    def _preflight(self, view: Path, context: BuildContext) -> dict[str, Any]:
        """exllamav2 must reproduce the fp16 source before it quantizes it: a runtime that misreads the model
        (issue 14: transformers 5's rope_parameters, read as the default base) or sees later tokens (the causality
        probe runs first) makes every EXL2 file garbage. Its Parity.to_dict(), with the attention backend and the
        causality probe, as the measurement's details keep them."""
        if not context.evaluation:
            raise ProfileError("EXL2 needs the evaluation (its parity preflight compares exllamav2 with the reference)",
                               "set evaluation.enabled: true, or leave exl2 out of the profile")
        spec_file, result_file = view.parent / "exl2-preflight.spec.json", view.parent / "exl2-preflight.json"
        spec_file.write_text(json.dumps(replace(context.evaluation, windows=4).to_json()))
        run_python(["-m", "quantkit.formats.exl2.runner", "preflight", str(view), str(spec_file), str(result_file)],
                   env=CHILD_ENV, what="exllamav2 parity preflight")
        raw = json.loads(result_file.read_text())
        parity = Parity.from_dict(raw)
        context.reporter.info(f"{parity.render()}; attention: {raw.get('attention')}")
        if not parity.passed:
            raise ToolError(f"exllamav2 does not reproduce {context.source.name} in fp16 ({parity.problems()}), so its EXL2 "
                            "files would be measured and published wrong",
                            "check the model's config.json against what exllamav2 reads (quantkit/config_view.py); "
                            "or leave exl2 out of the profile")
        return parity.to_dict() | {k: raw[k] for k in ("attention", "causality") if k in raw}

    def _calibration_parquet(self, text_spec: str, context: BuildContext) -> Path:
        """exllamav2 reads calibration rows from a parquet file; ours, so it never sees the evaluation text. Named
        by its text and made once: the measurement and the ladder (on Ray, tasks that may overlap) read one file
        that nobody rewrites while another reads it."""
        text = calibration_text(text_spec, context.evaluation_text)
        path = context.out_dir / ".quantkit" / f"exl2-calibration-{sha256_text(text)[:16]}.parquet"
        if not path.exists():
            source = path.with_suffix(".txt")
            write_text_atomic(source, text)
            run_python(["-m", "quantkit.formats.exl2.tool", "parquet", str(source), str(path)], what="calibration parquet")
        return path

    def reads_source(self, item: ArtifactPlan) -> bool:
        return True  # each bitrate is quantized from the source's weights, with the measurement as its guide

    def tools(self, item: ArtifactPlan, context: BuildContext) -> dict[str, str]:
        return versions("exllamav2", "torch")

    def inputs(self, item: ArtifactPlan, context: BuildContext) -> dict[str, str]:
        # The attention the converter's forward passes ran with: measurements and files from before CHILD_ENV
        # were calibrated on hidden states computed with bidirectional attention, and are remade.
        return calibration_identity(item.options["calibration"]["text"], context.evaluation_text) | {
            "attention": " ".join(f"{k}={v}" for k, v in sorted(CHILD_ENV.items()))}

    def describe(self, item: ArtifactPlan, path: Path, facts: dict[str, Any]) -> Description:
        if item.role == "measurement":
            return Description(size_bytes=path.stat().st_size, details={"parity": facts["parity"]} if "parity" in facts else {})
        cfg = json.loads((path / "config.json").read_text()).get("quantization_config", {})
        return Description(
            **weight_facts(path, facts), tensor_types={"exl2": 1}, details={k: cfg[k] for k in ("bits", "head_bits") if k in cfg},
            stated_bits=float(cfg.get("bits") or item.options["bits"]),
        )

    def evaluation_peak(self, artifact_bytes: int, vocab: int, window: int, config: dict[str, Any] | None,
                        item: ArtifactPlan | None = None) -> int:
        return self.evaluation.fixed_bytes + scored_logits(vocab, window)  # the file streams to the GPU, not held here


def _other_files(source: Source) -> int:
    """config, tokenizer and chat template: the converter copies them into every folder."""
    return sum(p.stat().st_size for p in source.path.iterdir() if p.is_file() and p.suffix != ".safetensors")


# ladder.py's lines: "quantkit-ladder: loaded in S s", "quantkit-ladder: VARIANT done in S s" or "... failed: CAUSE".
_LADDER_LINE = re.compile(r"quantkit-ladder: (\S+) (.*)$")


def _check(done: Finished, expected: Path) -> None:
    """exllamav2's converter reports many errors (" ## Error: ...") and still exits 0."""
    if not expected.exists():
        errors = [line.strip() for line in done.lines if line.lstrip().startswith("##")]
        raise ToolError(f"exllamav2 did not write {expected.name}: {(errors or done.lines[-1:] or ['no output'])[-1]}",
                        "the last lines of its output:\n" + "\n".join(done.lines[-15:]))

