"""The model card of a quant repo, generated from a build's report."""

from __future__ import annotations

from shlex import quote

from huggingface_hub import ModelCard, ModelCardData

from .. import __version__
from ..formats import Format
from ..report import BITS_LEGEND, PM_LEGEND, artifact_table, chat_lines, engine_lines, format_notes
from ..results import Judged, Report

PLOT = "size-vs-kld.png"


def local_dir(report: Report, fmt: Format, artifact: Judged) -> str:
    """Where the card's Download section puts a folder variant."""
    return f"{report.model}-{fmt.card.display}-{artifact.variant}"


def model_card(report: Report, repo_id: str, fmt: Format, quantized_by: str = "") -> ModelCard:
    """The card of one format's repo, from a report of its artifacts (only this format's), as the format lays it
    out: every file on main ("files"), a branch per variant with this card on main ("branches"), or a repo per
    variant with its folder on main ("repos"). `quantized_by`: the card's metadata (by default the repo's owner)."""
    src = report.source
    card = fmt.card
    base = src.base_model or src.repo_id
    data = ModelCardData(
        base_model=base,
        license=src.license,
        library_name=card.library_name,
        pipeline_tag="text-generation",
        tags=[t for t in [fmt.name, *card.tags, "quantized", "quantkit", src.model_type or ""] if t],
        base_model_relation="quantized" if base else None,
        quantized_by=quantized_by or repo_id.split("/")[0],
    )
    model = report.model
    base_link = f"[{base}](https://huggingface.co/{base})" if base else f"`{model}`"
    ev = report.evaluation
    arts = report.models
    layout = card.layout
    first = {"files": "file_link", "branches": "branch", "repos": "type"}[layout]
    rows = artifact_table(arts, [first, *(["type"] if first != "type" else []), "bpw",
                                 *(["stated"] if layout != "files" else []), "size", "ppl", "kld", "top1", "smoke",
                                 "tool", "json"],
                          extra=("Use case", lambda a: ("**FAILED CHECKS**: " + "; ".join(a.failures)) if a.failures
                                 else "; ".join(x for x in (card.use_hint(a.variant, a.bits_per_weight),
                                                            card.file_note(a)) if x))) + ["", BITS_LEGEND + PM_LEGEND]
    pick = next((a for a in arts if a.variant in card.featured), arts[-1])
    prompt = report.prompt_format
    title = f"# {model} {card.display}" + (f" {arts[0].variant}" if layout == "repos" else "")
    sections = [
        title,
        "",
        (f"The {card.display} {arts[0].variant} quantization" if layout == "repos" else f"{card.display} quantizations")
        + f" of {base_link}, made with quantkit {__version__} using {card.made_by(report.tools.get(fmt.name) or {})}. "
        f"{card.loads_in}",
        "",
        "## Prompt format",
        "",
        "Rendered from the model's own chat template:" if prompt else "The model has no chat template.",
        "",
        *(["```", prompt.rstrip("\n"), "```", ""] if prompt else []),
        "## Provided files" if layout == "files" else "## Provided variants" if layout == "branches" else "## This variant",
        "",
        *(["Each variant is a branch of this repo; `main` holds only this card.", ""] if layout == "branches" else []),
        *rows,
        "",
        f"Every variant was tested: perplexity on {ev.tokens} tokens of `{ev.text}` (windows of {ev.window}), "
        f"KL-divergence and top-1 agreement against the {ev.reference} on the same tokens, and a chat smoke test "
        f"({report.smoke.question!r} must be answered with {report.smoke.expect!r} and the turn must end).",
        "",
        f"![size vs KL-divergence]({PLOT})",
        "",
        *(["## Chat template, tool calls and JSON mode", "", *chat_lines(report), ""] if ev.reference_result else []),
        *(["## In the runtime's own engine", "", *engine, ""] if (engine := engine_lines(arts)) else []),
    ]
    for title, paragraphs in format_notes(report.artifacts).items():
        sections += [f"## {title}", ""] + [line for text in paragraphs for line in (text, "")]
    if report.changelog:
        sections += ["## Changelog", "", *[f"- {line}" for line in report.changelog], ""]
    # Readers paste these commands into a shell, and the names come from report.json: quoted, unless plainly safe.
    sections += ["## Download", "", "```bash"]
    if layout == "branches":
        sections += [f"hf download {repo_id} --revision {quote(a.variant)} "
                     f"--local-dir {quote(local_dir(report, fmt, a))}" for a in arts]
    elif layout == "repos":
        sections.append(f"hf download {repo_id} --local-dir {quote(local_dir(report, fmt, pick))}")
    elif pick.details.get("shards"):  # a folder of parts: every file under it
        sections.append(f"hf download {repo_id} --include {quote(pick.filename + '/*')} --local-dir .")
    else:
        sections.append(f"hf download {repo_id} {quote(pick.filename)} --local-dir .")
    sections += ["```", "", "## Run", "", *card.usage(repo_id, local_dir(report, fmt, pick), pick)]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(sections) + "\n")
