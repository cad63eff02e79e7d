"""`quantkit retemplate BUILD`: a build's chat template (and end-of-turn / special-token metadata) replaced in every
artifact without quantizing anything again, then checked as a build checks it.

A model's template fix (a wrong stop token, a tool-call format) otherwise means a whole new build. Here:

1. The new template comes from a file (`--chat-template FILE`) or from a source revision (`--from SOURCE@REV`: its
   tokenizer files only, never its weights). It must render in jinja2, and llama.cpp's engine must accept it
   (llama-server started on the build's GGUF with the new template), before anything is written: a template either
   refuses leaves the build as it was.
2. Every model artifact gets it through its format (Format.retemplate): a GGUF through gguf-py's own metadata
   writer (formats/gguf/metadata.py), a folder its tokenizer files. Each file is written whole under a temporary
   name, then renamed.
3. The manifest keeps each artifact as built (Manifest.rewrote): a later `quantkit build` resumes it, and what was
   quantized from a retemplated F16 stays current, since its tensors are the same.
4. The chat-integrity and runtime-engine checks run again against the new template; report.json and report.md are
   rewritten with the new hashes, verdicts and a changelog line, which the card shows. `quantkit publish` then
   uploads only what changed, in one commit.
"""

from __future__ import annotations

import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field, replace
from datetime import date
from pathlib import Path

from . import formats
from .build import engine_verdicts, source_call
from .errors import BuildFolderError, ChatTemplateError
from .evaluate.integrity import TOKENIZER_FILES, ChatFacts, folder_facts, mismatches, render_error
from .fsutil import check_free_space, tree_size
from .manifest import Manifest
from .progress import Reporter
from .report import prompt_format, save_report
from .results import Report


@dataclass(frozen=True)
class NewChat:
    """What retemplate puts into every artifact, and what the artifacts are then checked against."""

    facts: ChatFacts  # the chat setup every artifact must now match (its template: the new one): the checks' "source"
    origin: str  # for the changelog: "the file fix.jinja", "ORG/MODEL@abc123"
    tokenizer_files: dict[str, bytes] = field(default_factory=dict)  # a revision's files, for folder formats


@dataclass(frozen=True)
class RetemplateResult:
    rewritten: list[str]  # artifacts that got the new template
    failed: list[str]  # artifacts whose checks fail with it
    report_json: Path
    report_md: Path
    seconds: float


def chat_from_file(path: Path, current: ChatFacts) -> NewChat:
    """A template file, with the build's current tokens (only the template changes)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ChatTemplateError(f"{path} cannot be read as a UTF-8 template ({e})", "pass a Jinja chat template file")
    facts = replace(current, template=text)
    _renders(facts, str(path))
    return NewChat(facts=facts, origin=f"the file {path.name}")


def chat_from_source(spec: str, revision: str | None = None) -> NewChat:
    """The chat setup of a source revision: a local folder, or ORG/MODEL[@REV] on the Hub (its tokenizer files only)."""
    if "@" in spec and revision is None:
        spec, revision = spec.rsplit("@", 1)
    folder = Path(spec).expanduser()
    origin = str(folder.name)
    if not folder.is_dir():
        from huggingface_hub import snapshot_download

        from . import network

        folder = Path(network.retrying(lambda: snapshot_download(spec, revision=revision, allow_patterns=list(TOKENIZER_FILES),
                                                                 etag_timeout=network.timeout_s()),
                                       what=f"downloading the tokenizer files of {spec}"))
        origin = f"{spec}@{folder.name[:12]}"  # the snapshot folder is named by its commit
    facts = folder_facts(folder)
    if not facts.template:
        raise ChatTemplateError(f"{origin} has no chat template (no chat_template.jinja, no chat_template in "
                                "tokenizer_config.json)", "pass a revision that has one, or --chat-template FILE")
    _renders(facts, origin)
    files = {name: (folder / name).read_bytes() for name in TOKENIZER_FILES if (folder / name).is_file()}
    return NewChat(facts=facts, origin=origin, tokenizer_files=files)


def _renders(facts: ChatFacts, where: str) -> None:
    if error := render_error(facts):
        raise ChatTemplateError(f"the chat template of {where} does not render in jinja2: {error}",
                                "fix the template; nothing was changed")


def current_chat(build_dir: Path, report: Report) -> ChatFacts:
    """The chat setup the build's first model artifact has now, as its runtime reads it."""
    if not report.models:
        raise BuildFolderError(f"{build_dir} has no model artifact to retemplate", "build it first")
    first = report.models[0]
    return formats.get(first.backend).chat_facts(build_dir / first.filename)


def retemplate(build_dir: Path, new: NewChat, *, reporter: Reporter | None = None, threads: int = 2) -> RetemplateResult:
    reporter = reporter or Reporter()
    start = time.monotonic()
    report = Report.read(build_dir / "report.json")
    manifest = Manifest(build_dir)
    manifest.lock()
    manifest.fetch_stored(reporter.info)  # a --store build: the files are rewritten here
    with tempfile.TemporaryDirectory(prefix="quantkit-retemplate-") as tmp:
        template_file = Path(tmp) / "chat_template.jinja"
        template_file.write_text(new.facts.template, encoding="utf-8")
        _engine_accepts(build_dir, report, new, template_file, threads)
        # Each file is copied whole under a temporary name before it replaces the old one, `threads` at once.
        largest = sorted((tree_size(build_dir / a.filename) for a in report.models), reverse=True)
        check_free_space(build_dir, sum(largest[:max(1, threads)]), "the new copies of the files being rewritten")
        rewritten = []

        # Read here, not in the threads: llama.cpp's vocabulary loader silences the process's stdout and stderr.
        ids = {a.filename: _token_ids(new.facts, formats.get(a.backend).chat_facts(build_dir / a.filename))
               for a in report.models}

        def rewrite(a):
            formats.get(a.backend).retemplate(build_dir / a.filename, template_file, ids[a.filename], new.tokenizer_files)
            return a

        # Files at once, one a thread: gguf-py spends most of a small file's rewrite parsing its vocabulary (2.4 s
        # for the sample's 49,152 tokens). Each file is recorded as soon as it is rewritten, so one that fails
        # leaves the others as consistent as itself.
        with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
            for done in as_completed([pool.submit(rewrite, a) for a in report.models]):
                a = done.result()
                manifest.rewrote(f"artifact:{a.filename}", build_dir / a.filename, a.sha256)
                rewritten.append(a.filename)
                reporter.info(f"✓ {a.filename}: new chat template")

    call = source_call(report.evaluation.reference_result)
    engines = engine_verdicts(report.models, build_dir, manifest, new.facts, call, reporter, threads) \
        if report.chat_checks.engine else {}
    artifacts = []
    for a in report.artifacts:
        if a.filename not in rewritten:
            artifacts.append(a)
            continue
        path = build_dir / a.filename
        integrity = [m.render() for m in mismatches(new.facts, formats.get(a.backend).chat_facts(path))]
        engine = engines.get(a.filename)
        integrity += engine.template if engine else []
        failures = [f for f in a.failures if not f.startswith("chat integrity: ")] + [f"chat integrity: {m}" for m in integrity]
        sha = manifest.sha256(path)
        size = tree_size(path)
        artifacts.append(replace(a, sha256=sha, size_bytes=size, integrity=integrity, engine=engine, failures=failures))
        _record_result(manifest, artifacts[-1])
    line = (f"{date.today().isoformat()}: chat template replaced from {new.origin} in {len(rewritten)} file(s) "
            "(quantkit retemplate); no file was quantized again")
    report = replace(report, artifacts=artifacts, prompt_format=prompt_format(new.facts.template),
                     changelog=[*report.changelog, line])
    json_path, md_path = save_report(report, build_dir)
    failed = [a.filename for a in artifacts if a.filename in rewritten and a.failures]
    return RetemplateResult(rewritten, failed, json_path, md_path, time.monotonic() - start)


def _engine_accepts(build_dir: Path, report: Report, new: NewChat, template_file: Path, threads: int) -> None:
    """Before anything is written: each runtime engine the build has must accept the new template."""
    checked = set()
    for a in report.models:
        fmt = formats.get(a.backend)
        if a.backend in checked or not report.chat_checks.engine or not fmt.engine_identity():
            continue
        checked.add(a.backend)
        verdict = fmt.engine_check(build_dir / a.filename, new.facts, None, threads, template_file=template_file)
        refused = [t for t in verdict.template if "rejects the template" in t]
        if refused:
            raise ChatTemplateError(f"{refused[0]} (checked on {a.filename})",
                                    "fix the template so that the runtime's engine can run it; nothing was changed")


def _token_ids(new: ChatFacts, artifact: ChatFacts) -> dict[str, int]:
    """The special-token ids the artifact must change: EOS, and EOT (the token the new template ends a turn with)."""
    out = {}
    eos_text = new.texts.get(new.tokens.get("eos"))
    if eos_text is not None and artifact.special.get(eos_text) not in (None, artifact.tokens.get("eos")):
        out["eos"] = artifact.special[eos_text]
    end = new.end_of_turn()
    if end is not None and "eot" in artifact.tokens and artifact.special.get(end) not in (None, artifact.tokens.get("eot")):
        out["eot"] = artifact.special[end]
    return out


def _record_result(manifest: Manifest, artifact) -> None:
    """The manifest's copy of the artifact's result follows its new hash and size (a resumed build reads it)."""
    rec = manifest.steps.get(f"artifact:{artifact.filename}")
    if rec and isinstance(rec.get("result"), dict):
        rec["result"].update(sha256=artifact.sha256, size_bytes=artifact.size_bytes)
        manifest.save()
