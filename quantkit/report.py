"""report.json (for machines) and report.md (for people), written from the same data."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Callable

from . import __version__
from .evaluate.chat import render_chat
from .evaluate.metrics import scored_range
from .evaluate.parity import Parity
from .evaluate.probes import describe
from .evaluate.stats import parse_precision
from .fsutil import human_size, write_json_atomic, write_text_atomic
from .manifest import Manifest
from .plan import BuildPlan, EvalResult
from .results import Built, Judged, Measured, Report, ReportEvaluation, ReportSource, models
from .sample import SAMPLE_MARKER


def write_reports(plan: BuildPlan, results: list[Judged], reference: EvalResult | None,
                  manifest: Manifest) -> tuple[Path, Path]:
    """report.json and report.md in the build folder, from one Report."""
    return save_report(make_report(plan, results, reference, manifest), plan.out_dir)


def save_report(report: Report, out_dir: Path) -> tuple[Path, Path]:
    """report.json and report.md of `report`, each written whole (temporary name, then rename)."""
    json_path, md_path = out_dir / "report.json", out_dir / "report.md"
    write_json_atomic(json_path, report_json(report))
    write_text_atomic(md_path, render_markdown(report))
    return json_path, md_path


def make_report(plan: BuildPlan, results: list[Judged], reference: EvalResult | None, manifest: Manifest) -> Report:
    src = plan.source
    ev = plan.profile.evaluation
    first, last = scored_range(ev.window)
    source = ReportSource(
        repo_id=src.repo_id, revision=src.revision, local=src.repo_id is None, from_cache=src.from_cache,
        sample=(src.path / SAMPLE_MARKER).is_file(), architecture=src.architecture, dtype=src.dtype,
        license=src.license, base_model=src.repo_id or src.base_model, model_type=src.config.get("model_type"),
        converted=src.converted)
    evaluation = ReportEvaluation(
        text=public_text_name(ev.text), tokens=manifest.steps.get("tokens", {}).get("count"), window=ev.window,
        method=f"non-overlapping windows of {ev.window} tokens; positions {first}..{last - 1} of each window are scored "
               "(llama-perplexity's layout); KL-divergence is KL(reference || artifact) per scored position, "
               "averaged; top-1 is the share of positions where both argmaxes agree",
        reference=f"{src.name} {src.dtype} (the source checkpoint, run with transformers: weights as stored, "
                  "computed in float32)",
        reference_result=reference,
        precision=p.describe() if (p := parse_precision(ev.precision)) else None)
    return Report(
        model=src.name, source=source, profile=plan.profile.name, evaluation=evaluation, artifacts=list(results),
        quantkit_version=__version__, prompt_format=prompt_format(src.chat_template),
        # What made the files, by format: each format's own tools (Format.tools), as the artifacts record them.
        tools=tools_by_format(results), chat_checks=plan.profile.chat_checks,
        bounds=[b.describe() for b in plan.profile.bounds], smoke=plan.profile.smoke, publish=plan.profile.publish,
        parity=parity_checks(results), inversions=inversions(results, source))


def report_json(report: Report) -> dict:
    """What report.json holds: the Report, and for machines each artifact's fallbacks in one line."""
    from . import formats

    data = report.to_dict()
    for entry, a in zip(data["artifacts"], report.artifacts):
        entry["fallback_summary"] = formats.get(a.backend).card.fallback_summary(a)
    return data


def tools_by_format(artifacts: list[Built]) -> dict[str, dict[str, str]]:
    """{format: {tool: version}} over the artifacts (a converter, a quantizer, a calibration tool: each its own)."""
    out: dict[str, dict[str, str]] = {}
    for a in artifacts:
        out.setdefault(a.backend, {}).update(a.tools)
    return out


def parity_checks(artifacts: list[Measured]) -> list[Parity]:
    """Each runtime's run of the unquantized model against the reference, as its format reports it
    (Format.parity: from the evaluation of an unquantized file, or from a preflight kept with an artifact)."""
    from . import formats

    return [p for a in artifacts if (p := formats.get(a.backend).parity(a)) is not None]


def inversions(artifacts: list[Measured], source: ReportSource) -> list[str]:
    """Pairs where a bigger file of the same format has a higher mean KLD, by more than twice the standard
    error of the difference, with the tensor types that tell the two apart and what the format makes of it."""
    from . import formats

    out = []
    scored = [a for a in models(artifacts) if a.evaluation is not None and a.evaluation.kld_se is not None]
    for big in scored:
        for small in scored:
            if small.backend != big.backend or small.size_bytes >= big.size_bytes:
                continue
            eb, es = big.evaluation, small.evaluation
            if eb.kld_mean - es.kld_mean <= 2 * math.hypot(eb.kld_se, es.kld_se):
                continue
            types_b, types_s = Counter(big.tensor_types), Counter(small.tensor_types)
            only_b = ", ".join(f"{t} ×{n}" for t, n in (types_b - types_s).items())
            only_s = ", ".join(f"{t} ×{n}" for t, n in (types_s - types_b).items())
            why = formats.get(big.backend).card.explain_inversion(big, small, source)
            out.append(f"{label(big)} ({big.bits_per_weight:.2f} bits/param) has KLD {eb.kld_mean:.4f} ± "
                       f"{eb.kld_se:.4f}, worse than {label(small)} ({small.bits_per_weight:.2f} bits/param) at "
                       f"{es.kld_mean:.4f} ± {es.kld_se:.4f}. Tensor types only the bigger file has: {only_b or 'none'}; "
                       f"only the smaller: {only_s or 'none'}." + (f" {why}" if why else ""))
    return out


def prompt_format(template: str | None) -> str | None:
    """The chat template rendered with placeholders, as model cards show it."""
    if not template:
        return None
    messages = [{"role": "system", "content": "{system_prompt}"}, {"role": "user", "content": "{prompt}"}]
    try:
        return render_chat(template, messages)
    except Exception:  # a template that needs variables we cannot guess: the card says so instead
        return None


def _memory_cells(step: Built | EvalResult) -> str:
    """Planned and measured peak memory and wall time of a build step or an evaluation ('—': not run this time)."""
    planned, measured, seconds = step.predicted_peak_bytes, step.peak_rss_bytes, step.seconds
    anon, mapped = step.peak_anon_bytes, step.peak_file_bytes
    split = f"{human_size(anon)} / {human_size(mapped or 0)}" if anon else "—"
    return (f"{human_size(planned) if planned else '—'} | {human_size(measured) if measured else '—'} | {split} | "
            f"{f'{seconds:.1f} s' if seconds else '—'} |")


def public_text_name(spec: str) -> str:
    """A user's text file is named by its file name only: reports must not carry local paths."""
    return spec if spec.startswith(("builtin:", "hf:")) else f"file:{Path(spec).name}"


def _fmt(value, spec: str, none: str = "—") -> str:
    return none if value is None else format(value, spec)


def _pct(x: float | None) -> float | None:
    return None if x is None else 100 * x


def _pm(value: float | None, se: float | None, spec: str) -> str:
    """'0.0457 ± 0.0005': a value with its standard error, when there is one."""
    return _fmt(value, spec) + (f" ± {format(se, spec)}" if value is not None and se else "")


def _of(e: EvalResult | None, name: str):
    """A measured number, None when the artifact was not evaluated."""
    return None if e is None else getattr(e, name)


def _probe_cell(e: EvalResult | None, probe: str) -> str:
    r = e.probes.get(probe) if e else None
    if not r:
        return "—"
    what = "valid" if r["valid"] else "invalid" if r["parsed"] else "none"
    return what if r.get("agrees") is None else f"{what}, {'=' if r['agrees'] else '≠'} source"


def label(a: Built) -> str:
    """How tables name an artifact, as its format says: "Q4_K_M" (a GGUF type), "GPTQ 4bit-g32"."""
    from . import formats

    return formats.get(a.backend).card.label(a.variant)


BITS_LEGEND = ("Bits/param: the file's weights in bits over the model's parameters, embeddings and output head "
               "included (what a download costs). Stated bits: the rate the quantizer states for the layers it "
               "quantized; none (—) for a format that mixes types per tensor.")

PM_LEGEND = " ± is one standard error of the mean over the scored tokens, as llama-perplexity prints it."

# Column key -> (header, alignment, cell of (artifact, its evaluation or None)). One definition for the report's and
# the model card's tables.
COLUMNS = {
    "file": ("File", "---", lambda a, e: a.filename),
    "file_link": ("File", "---", lambda a, e: f"[{a.filename}](./{a.filename})"),
    "branch": ("Branch", "---", lambda a, e: f"`{a.variant}`"),
    "type": ("Quant type", "---", lambda a, e: label(a)),
    "size": ("Size", "---:", lambda a, e: human_size(a.size_bytes)),
    "bpw": ("Bits/param", "---:", lambda a, e: f"{a.bits_per_weight:.2f}" if a.bits_per_weight else "—"),
    "stated": ("Stated bits", "---:", lambda a, e: f"{a.stated_bits:.2f}" if a.stated_bits else "—"),
    "ppl": ("PPL", "---:", lambda a, e: _pm(_of(e, "perplexity"), _of(e, "perplexity_se"), ".3f")),
    "dppl": ("ΔPPL", "---:", lambda a, e: _fmt(_of(e, "ppl_delta_pct"), "+.2f") + "%"),
    "kld": ("KLD vs reference", "---:", lambda a, e: _pm(_of(e, "kld_mean"), _of(e, "kld_se"), ".4f")),
    "kld99": ("KLD p99", "---:", lambda a, e: _fmt(_of(e, "kld_p99"), ".4f")),
    "top1": ("Top-1", "---:", lambda a, e: _pm(_pct(_of(e, "top1_agreement")), _pct(_of(e, "top1_se")), ".1f") + "%"),
    "smoke": ("Smoke test", "---", lambda a, e: ("pass" if e.smoke_passed else "FAIL") if e else "—"),
    "tool": ("Tool call", "---", lambda a, e: _probe_cell(e, "tool_call")),
    "json": ("JSON mode", "---", lambda a, e: _probe_cell(e, "json_mode")),
    "engine": ("Runtime engine", "---", lambda a, e: a.engine.summary() if a.engine else "—"),
    "checks": ("Checks", "---", lambda a, e: "FAILED" if a.failures else "pass" if e else "—"),
}


def artifact_table(artifacts: list[Judged], columns: list[str],
                   extra: tuple[str, Callable[[Judged], str]] | None = None) -> list[str]:
    """Markdown table rows; `extra` adds a last column (header, function of the artifact)."""
    cols = [COLUMNS[c] for c in columns] + ([(extra[0], "---", lambda a, e: extra[1](a))] if extra else [])
    lines = ["| " + " | ".join(c[0] for c in cols) + " |", "|" + "|".join(c[1] for c in cols) + "|"]
    lines += ["| " + " | ".join(c[2](a, a.evaluation) for c in cols) + " |" for a in artifacts]
    return lines


def format_notes(artifacts: list[Judged]) -> dict[str, list[str]]:
    """Each format's own sections about its artifacts (Card.notes), by title."""
    from . import formats

    out: dict[str, list[str]] = {}
    for name in dict.fromkeys(a.backend for a in artifacts):
        for title, paragraphs in formats.get(name).card.notes([a for a in artifacts if a.backend == name]).items():
            out.setdefault(title, []).extend(paragraphs)
    return out


STATS_LEGEND = ("llama-perplexity's statistics against the fp16 source, with its definitions: ln(PPL ratio) is the "
                "mean of ln p(reference) − ln p(artifact) for the right token; KLD percentiles are over scored tokens; "
                "same top is the top-1 agreement; RMS Δp is the root mean square of p(artifact) − p(reference) for the "
                "right token.")


def stats_table(artifacts: list[Judged]) -> list[str]:
    lines = ["| File | Tokens | ln(PPL ratio) | Mean KLD | Median | 90% | 95% | 99% | 99.9% | Max KLD | Same top | RMS Δp |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for a in artifacts:
        e = a.evaluation
        if e is None or e.ln_ppl_ratio is None:
            continue
        lines.append(f"| {a.filename} | {e.tokens_scored} | {_pm(e.ln_ppl_ratio, e.ln_ppl_ratio_se, '.5f')} | "
                     f"{_pm(e.kld_mean, e.kld_se, '.5f')} | " + " | ".join(
                         _fmt(getattr(e, k), ".4f") for k in ("kld_median", "kld_p90", "kld_p95", "kld_p99", "kld_p999", "kld_max"))
                     + f" | {_pm(_pct(e.top1_agreement), _pct(e.top1_se), '.2f')}% | "
                       f"{_pm(_pct(e.rms_dp), _pct(e.rms_dp_se), '.2f')}% |")
    return lines


def chat_lines(report: Report) -> list[str]:
    """What the source did on each probe, and per artifact: integrity, then each probe against the source."""
    ref = report.evaluation.reference_result
    names = {"tool_call": "Tool call", "json_mode": "JSON mode"}
    lines = ["Every artifact's chat template renders four fixed conversations (system + user, multi-turn, tools, "
             "a tool response) byte for byte as the source's does, and its BOS, EOS, end-of-turn and special tokens "
             "match the source's. Then a tool-call and a JSON-mode prompt (rendered from the source's template) are "
             "answered greedily; each reply is parsed, validated against its JSON schema and compared with the fp16 "
             "source's reply.", ""]
    for probe, r in (ref.probes if ref else {}).items():
        lines.append(f"- fp16 source, {names[probe]}: {describe(r)}; reply {r['reply'][:160]!r}")
    for a in report.models:
        parts = ["template and stop tokens " + ("match" if not a.integrity else "DIFFER: " + "; ".join(a.integrity))]
        parts += [f"{names[p]}: {describe(r)}" + (f", {r['agreement']}" if r.get("agreement") else "")
                  for p, r in (a.evaluation.probes if a.evaluation else {}).items()]
        lines.append(f"- **{label(a)}**: " + "; ".join(parts))
    return lines


def engine_lines(artifacts: list[Judged]) -> list[str]:
    """Each artifact's chat setup as its runtime's engine sees it (Format.engine_check)."""
    checked = [a for a in artifacts if a.engine]
    if not checked:
        return []
    engines = ", ".join(sorted({a.engine.engine.split()[0] for a in checked}))
    lines = [f"Each file was loaded in its runtime's own engine ({engines}, from the same build of the tools that "
             "made it). Four fixed conversations (system + user, multi-turn, tools, an assistant tool call then a tool "
             "response) went through its template engine (`/apply-template`) "
             "and had to match the source's transformers rendering byte for byte; a tool call, sent as the "
             "assistant's turn with `tools=[...]` (`/v1/chat/completions`), had to come back from its own parser "
             "as `tool_calls` with the same name and arguments.", ""]
    for a in checked:
        v = a.engine
        template = "renders like the source" if not v.template else "; ".join(v.template)
        lines.append(f"- **{label(a)}**: template {template}; parses tool calls: "
                     f"{'yes' if v.tool_calls else 'no'} ({v.tool_call_detail}; {v.call_source}); {v.seconds:.1f} s")
    return lines


def render_markdown(report: Report) -> str:
    ev = report.evaluation
    ref = ev.reference_result
    src = report.source
    origin = f"{src.repo_id} @ {src.revision}" if src.repo_id else "a local folder"
    if src.from_cache:
        origin += f", from the local Hugging Face cache ({src.from_cache})"
    if src.converted:
        origin += f"; {src.converted}"
    lines = [
        f"# {report.model}: quantization report",
        "",
        f"Source: {origin} ({src.architecture}, {src.dtype}). Profile `{report.profile}`, "
        f"quantkit {report.quantkit_version}" + "".join(f"; {fmt}: {', '.join(f'{t} {v}' for t, v in tools.items())}"
                                                        for fmt, tools in report.tools.items() if tools) + ".",
        "",
        (f"Evaluation: `{ev.text}`, {ev.tokens} tokens, windows of {ev.window}; reference: {ev.reference}, "
         f"perplexity {ref.perplexity:.3f}. {ev.method}." + (f" Note: {ref.note}." if ref.note else "")
         if ref else "Evaluation: off (`evaluation.enabled: false`); the files below were built but not measured."),
        "",
        *artifact_table(report.models, ["file", "type", "size", "bpw", "stated", "ppl", "dppl", "kld", "kld99",
                                        "top1", "smoke", "tool", "json", "engine", "checks"]),
        "",
        BITS_LEGEND + PM_LEGEND,
    ]
    if ref:
        lines += ["", "## Statistics", "", STATS_LEGEND, "", *stats_table(report.models)]
        if ev.precision:
            lines += ["", f"Scored until {ev.precision} (or the whole text): each artifact's Tokens column says "
                          "how many it took."]
    if failed := report.failed:
        lines += ["", "## Failed checks", "", "These files must not be released as they are (`quantkit publish` "
                  "refuses them unless given --allow-failed):", ""]
        lines += [f"- **{label(a)}**: " + "; ".join(a.failures) for a in failed]
    if report.bounds:
        lines += ["", "Quality bounds of the profile: " + "; ".join(report.bounds) + "."]
    if report.inversions:
        lines += ["", "## Inversions", "", "A bigger file of the same format that is worse beyond the error bars:", ""]
        lines += [f"- {i}" for i in report.inversions]
    if engine := engine_lines(report.models):
        lines += ["", "## In the runtime's own engine", "", *engine]
    if ref and (chat := chat_lines(report)):
        lines += ["", "## Chat template, tool calls and JSON mode", "", *chat]
    if report.parity:
        lines += ["", "## Parity with the fp16 source", "",
                  "Each runtime first runs the unquantized model; only one that reproduces the reference is trusted "
                  "with the quantized files.", "", *[f"- {p.render()}" for p in report.parity]]
    if notes := [f"- **{label(a)}**: {a.evaluation.note}" for a in report.artifacts if a.evaluation and a.evaluation.note]:
        lines += ["", "## Notes", "", *notes]
    for title, paragraphs in format_notes(report.artifacts).items():
        lines += ["", f"## {title}", ""] + [line for text in paragraphs for line in (text, "")][:-1]
    smoke = report.smoke
    lines += ["", "## Smoke test", "",
              f"System: {smoke.system!r}; user: {smoke.question!r}; greedy, at most {smoke.max_tokens} tokens; "
              f"passes when the turn ends with the end-of-turn token and the reply contains {smoke.expect!r}.", ""]
    lines += [f"- **{label(a)}**: {'pass' if a.evaluation.smoke_passed else 'FAIL'} ({a.evaluation.smoke_reason}): "
              f"{a.evaluation.smoke_reply!r}" for a in report.artifacts if a.evaluation]
    lines += ["", "## Build", "", "| File | Made from | Planned size | Size | Planned peak memory | Peak memory (measured) | "
              "Anonymous / file-backed | Time |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {a.filename} | {a.made_from or f'the source ({report.source.dtype})'} | {human_size(a.predicted_bytes)} | "
              f"{human_size(a.size_bytes)} | " + _memory_cells(a) for a in report.artifacts]
    if ref:
        lines += ["", "| Evaluation of | Planned peak memory | Peak memory (measured) | Anonymous / file-backed | Time |",
                  "|---|---:|---:|---:|---:|"]
        rows = [("reference (fp16 source)", ref)] + [(a.filename, a.evaluation) for a in report.artifacts if a.evaluation]
        lines += [f"| {name} | " + _memory_cells(e) for name, e in rows]
    lines += ["", "Peak memory is the process's peak resident set; it includes pages of memory-mapped "
              "inputs, which the system can reclaim. The next column splits it (sampled every 0.1 s, each its own "
              "peak): anonymous memory, which must fit, and file-backed pages, which the system can drop and read "
              "again. It is measured only when the step runs, not on a resumed run."]
    if report.changelog:
        lines += ["", "## Changelog", "", *[f"- {line}" for line in report.changelog]]
    lines += ["", "## Tensor types", ""]
    lines += [f"- {label(a)}: " + ", ".join(f"{k} ×{v}" for k, v in a.tensor_types.items()) for a in report.models]
    return "\n".join(lines) + "\n"
