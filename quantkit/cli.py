"""The `quantkit` command: a thin layer over quantkit.build and friends."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from . import DEFAULT_PROFILE, __version__
from .errors import QuantkitError

app = typer.Typer(help="Turn a Hugging Face fp16 checkpoint into a checked set of quantized models.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)

SourceArg = typer.Argument(None, help="Hub repo id (ORG/MODEL) or a local checkpoint folder.", show_default=False)
SampleOpt = typer.Option(False, "--sample", help="Use the bundled sample model (SmolLM2-135M-Instruct, built offline).")
ProfileOpt = typer.Option(None, "--profile", "-p", help="Profile name (see profiles/) or a YAML file "
                          f"(default: {DEFAULT_PROFILE}; sample with --sample).", show_default=False)
OutOpt = typer.Option(Path("builds"), "--out", "-o", help="Parent folder; the build goes into OUT/<Model>/.")
RevisionOpt = typer.Option(None, "--revision", help="Branch, tag or commit of a Hub repo.")
PickleOpt = typer.Option(False, "--allow-pickle", help="Accept pickled weights (pytorch_model.bin): quantkit converts a "
                         "copy to safetensors with torch.load(weights_only=True).")
MemoryOpt = typer.Option(None, "--memory", help="Memory one step may use, e.g. 16G, to plan for a smaller machine "
                         "(default: this machine's; env QUANTKIT_MEMORY).", show_default=False)
LlamaOpt = typer.Option(None, "--llama-cpp", help="A llama.cpp checkout whose converter to use (default: the one "
                        "matching the installed llama-cpp-python).", envvar="QUANTKIT_LLAMA_CPP")


def _memory_limit(memory: Optional[str], option: str = "--memory") -> Optional[int]:
    from .fsutil import parse_bytes

    if memory is None:
        return None  # this machine's, or $QUANTKIT_MEMORY
    value = parse_bytes(memory)
    if value is None:
        raise QuantkitError(f"{option} {memory!r} is not a size", "write it like 16G, 512M or a number of bytes")
    return value


def _version(value: bool) -> None:
    if value:
        typer.echo(f"quantkit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Show the version and exit.")) -> None:
    pass


def _source(source: Optional[str], sample: bool, profile: Optional[str], reporter) -> tuple[str, str]:
    """The source to build and the profile to use (the sample has a profile of its own)."""
    if sample == bool(source):
        raise QuantkitError("give either a SOURCE or --sample", "e.g. quantkit build --sample, or quantkit build ORG/MODEL")
    if sample:
        from .sample import ensure_sample

        return str(ensure_sample(log=reporter.info)), profile or "sample"
    return source, profile or DEFAULT_PROFILE


@app.command()
def plan(source: Optional[str] = SourceArg, sample: bool = SampleOpt, profile: Optional[str] = ProfileOpt, out: Path = OutOpt,
         revision: Optional[str] = RevisionOpt, allow_pickle: bool = PickleOpt,
         llama_cpp: Optional[str] = LlamaOpt, memory: Optional[str] = MemoryOpt,
         gpu: Optional[str] = typer.Option(None, "--gpu", help="Plan for a machine with a CUDA GPU of this memory, "
                                           "e.g. 80G: formats that need one are planned, not refused.",
                                           show_default=False)) -> None:
    """Show what `build` would make, the disk it needs and each step's peak memory, without building anything.
    Exits 5 when a step cannot fit this machine's memory."""
    from .build import make_plan
    from .progress import Reporter

    reporter = Reporter()
    p = make_plan(*_source(source, sample, profile, reporter), out, revision=revision, allow_pickle=allow_pickle,
                  converter=llama_cpp, memory_limit=_memory_limit(memory),
                  gpu_memory=_memory_limit(gpu, "--gpu") or 0, reporter=reporter)
    typer.echo(p.render())
    p.check_memory()


StoreOpt = typer.Option(None, "--store", help="Keep the build in this artifact store too, an fsspec URL "
                        "(file:///path, s3://bucket/prefix): with --ray, the nodes need then share no filesystem; "
                        "without, another machine can resume or publish it from there (docs/cluster.md).",
                        show_default=False)


@app.command()
def build(source: Optional[str] = SourceArg, sample: bool = SampleOpt, profile: Optional[str] = ProfileOpt, out: Path = OutOpt,
          revision: Optional[str] = RevisionOpt, allow_pickle: bool = PickleOpt,
          llama_cpp: Optional[str] = LlamaOpt, memory: Optional[str] = MemoryOpt,
          threads: int = typer.Option(0, "--threads", help="CPU threads (0: $QUANTKIT_THREADS, else every core this process may run on)."),
          publish_: bool = typer.Option(False, "--publish", help="Publish to the Hub when the build succeeds "
                                        "(also done when the profile sets publish.auto)."),
          owner: Optional[str] = typer.Option(None, "--owner", help="Hub user or organisation to publish under."),
          ray: Optional[str] = typer.Option(None, "--ray", help="Run the artifact steps as tasks on this Ray cluster "
                                            "(host:port, ray://host:10001 or auto); the build folder must be "
                                            "on storage every node shares, unless --store is given.", show_default=False),
          store: Optional[str] = StoreOpt,
          quiet: bool = typer.Option(False, "--quiet", "-q", help="Only warnings and errors.")) -> None:
    """Convert, quantize and evaluate every artifact of a profile; re-running resumes."""
    from .build import make_plan, run_build
    from .progress import Reporter

    reporter = Reporter(quiet=quiet)
    executor = None
    if ray:
        from .cluster import RayExecutor

        executor = RayExecutor(ray, store=store)
    limit, where = _memory_limit(memory), "this machine"
    if executor and limit is None:
        limit, where = executor.max_memory, "the largest Ray node"
    p = make_plan(*_source(source, sample, profile, reporter), out, revision=revision, allow_pickle=allow_pickle,
                  converter=llama_cpp,
                  remote_gpus=bool(executor and executor.max_gpus), memory_limit=limit, memory_where=where,
                  reporter=reporter)
    reporter.info(p.render())
    result = run_build(p, reporter=reporter, threads=threads or None, converter=llama_cpp, executor=executor,
                       store=store)
    typer.echo(Path(result.report_md).read_text().split("\n## ")[0].rstrip())
    typer.echo(f"\nbuilt {len(result.built)}, evaluated {len(result.evaluated)} in {result.seconds:.1f}s -> {p.out_dir}")
    result.raise_for_failures()
    if publish_ or p.profile.publish.auto:
        _publish(p.out_dir, owner=owner, dry_run=False, reporter=reporter)


@app.command()
def publish(build_dir: Path = typer.Argument(..., help="A build folder (OUT/<Model>) with report.json."),
            owner: Optional[str] = typer.Option(None, "--owner", help="Hub user or organisation (default: the "
                                                "profile's publish.owner, else the token's user)."),
            dry_run: bool = typer.Option(False, "--dry-run", help="Print the commit plan; no network."),
            allow_failed: bool = typer.Option(False, "--allow-failed", help="Publish even files that failed their "
                                              "checks (chat integrity, quality bounds); the card marks them.")) -> None:
    """Publish a build: model card, plot and files to one Hub repo per format (HF_TOKEN or `hf auth login`)."""
    from .progress import Reporter

    _publish(build_dir, owner=owner, dry_run=dry_run, reporter=Reporter(), allow_failed=allow_failed)


def _publish(build_dir: Path, *, owner: Optional[str], dry_run: bool, reporter, allow_failed: bool = False) -> None:
    from .publish.hub import plan_publish, publish as push

    commits = plan_publish(build_dir, owner=owner, offline=dry_run, allow_failed=allow_failed)
    for c in commits:
        typer.echo(c.render())
    if dry_run:
        typer.echo("dry run: nothing was uploaded")
        return
    for r in push(commits, reporter=reporter):
        state = f"new commit {r.commit}" if r.commit else f"up to date at {r.head}"
        typer.echo(f"{r.repo_id}@{r.branch}: {state}")


@app.command()
def retemplate(build_dir: Path = typer.Argument(..., help="A build folder (OUT/<Model>) with report.json."),
               from_: Optional[str] = typer.Option(None, "--from", help="Take the chat template and tokenizer files of "
                                                   "a source revision: a folder, or ORG/MODEL, or ORG/MODEL@REVISION (tokenizer "
                                                   "files only; never weights)."),
               chat_template: Optional[Path] = typer.Option(None, "--chat-template", help="Take this Jinja chat "
                                                            "template file."),
               threads: int = typer.Option(2, "--threads", help="CPU threads for the runtime checks."),
               publish_: bool = typer.Option(False, "--publish", help="Publish the build afterwards (as `quantkit "
                                             "publish`): one commit of the changed files.")) -> None:
    """Replace the chat template (and EOS/EOT) of every built file without quantizing again, re-run the chat
    checks, and update the reports; `quantkit publish` then uploads only the changed files."""
    from .progress import Reporter
    from .retemplate import chat_from_file, chat_from_source, current_chat, retemplate as run_retemplate
    from .results import Report

    if (from_ is None) == (chat_template is None):
        from .errors import ChatTemplateError

        raise ChatTemplateError("give exactly one of --from and --chat-template",
                            "e.g. quantkit retemplate builds/MODEL --chat-template fixed.jinja")
    if from_ is not None:
        new = chat_from_source(from_)
    else:
        new = chat_from_file(chat_template, current_chat(build_dir, Report.read(build_dir / "report.json")))
    result = run_retemplate(build_dir, new, reporter=Reporter(), threads=threads)
    typer.echo(f"retemplated {len(result.rewritten)} file(s) in {result.seconds:.1f}s -> {result.report_md}")
    if result.failed:
        from .errors import QualityGateFailed

        raise QualityGateFailed(f"{len(result.failed)} file(s) fail their chat checks with the new template: "
                                f"{', '.join(result.failed)}", f"see {result.report_md}")
    if publish_:
        _publish(build_dir, owner=None, dry_run=False, reporter=Reporter())


QueueOpt = typer.Option(None, "--queue", help="The job queue: an SQLite file, or a PostgreSQL URL "
                        "(postgresql://USER:PASSWORD@HOST/DB) for workers on several machines (default: "
                        "$QUANTKIT_QUEUE, else ~/.local/state/quantkit/queue.db).", show_default=False)


def _queue(where: Optional[str]):
    from .jobs.queue import open_queue

    return open_queue(where)


@app.command()
def watch(orgs: list[str] = typer.Argument(..., help="Hub users or organisations whose models to watch."),
          profile: str = typer.Option(DEFAULT_PROFILE, "--profile", "-p", help="Profile every job builds with."),
          out: str = typer.Option("builds", "--out", "-o", help="Where the jobs' builds go: a folder (OUT/<Model>/; "
                                  "every worker must see it at this path), or an artifact store URL (file:///path, "
                                  "s3://bucket/prefix) that each worker builds into and uploads to."),
          queue: Optional[str] = QueueOpt,
          architecture: list[str] = typer.Option([], "--architecture", help="Only these config architectures "
                                                 "(repeatable), e.g. LlamaForCausalLM."),
          license_: list[str] = typer.Option([], "--license", help="Only these licences (repeatable), e.g. apache-2.0."),
          match: str = typer.Option("", "--match", help="Only model names matching this glob, e.g. '*-Instruct'."),
          min_params: str = typer.Option("0", "--min-params", help="At least this many parameters (500M, 7B, ...)."),
          max_params: str = typer.Option("0", "--max-params", help="At most this many parameters (0: no limit)."),
          attempts: int = typer.Option(3, "--attempts", help="Tries per job before it is marked failed."),
          every: float = typer.Option(0, "--every", help="Seconds between passes; 0: one pass, then exit (for cron).")) -> None:
    """Queue one build job for each new or updated model repo of ORGS (HF_ENDPOINT and HF_TOKEN apply)."""
    import time

    from .jobs.watch import WatchFilters, parse_count, watch_once

    q = _queue(queue)
    filters = WatchFilters(tuple(architecture), tuple(license_), match, parse_count(min_params), parse_count(max_params))
    while True:
        try:
            typer.echo(watch_once(q, orgs, profile, out=out, filters=filters, max_attempts=attempts).render())
        except QuantkitError as e:
            if not every:
                raise
            typer.echo(f"error: {e}; next pass in {every:g}s", err=True)  # a Hub outage must not end the watch
        if not every:
            return
        time.sleep(every)


jobs_app = typer.Typer(help="The job queue: list, show, retry and cancel jobs.", no_args_is_help=True)
app.add_typer(jobs_app, name="jobs")


@jobs_app.command("list")
def jobs_list(state: Optional[str] = typer.Option(None, "--state", help="queued, running, done, failed or cancelled."),
              queue: Optional[str] = QueueOpt) -> None:
    """One line a job."""
    q = _queue(queue)
    for job in q.list(state):
        typer.echo(job.render())
    counts = q.counts()
    typer.echo(", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or f"no jobs in {q.where}")


@jobs_app.command("show")
def jobs_show(job_id: int, queue: Optional[str] = QueueOpt,
              lines: int = typer.Option(40, "--lines", "-n", help="Lines of the job's log to print (0: all).")) -> None:
    """A job, and the end of its log."""
    import dataclasses
    import time

    q = _queue(queue)
    job = q.get(job_id)
    for key, value in dataclasses.asdict(job).items():
        if key in ("created", "updated", "lease_until") and value:
            value = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(value))
        if key == "profile_text" and value:
            value = f"({len(value.splitlines())} lines of YAML, kept in the queue)"
        typer.echo(f"{key:13} {value}")
    typer.echo(f"{'log':13} " + ("in the queue" if q.keeps_logs else str(q.log_path(job_id))))
    if (log := q.log_text(job_id)) is not None:
        text = log.splitlines()
        typer.echo("\n".join(text[-lines:] if lines else text))


@jobs_app.command("retry")
def jobs_retry(job_id: int, queue: Optional[str] = QueueOpt) -> None:
    """Queue a failed or cancelled job again (its build resumes from what it finished)."""
    typer.echo(_queue(queue).retry(job_id).render())


@jobs_app.command("cancel")
def jobs_cancel(job_id: int, queue: Optional[str] = QueueOpt) -> None:
    """Cancel a queued job, or stop a running one (its worker stops the build at its next lease renewal)."""
    typer.echo(_queue(queue).cancel(job_id).render())


@app.command()
def serve(queue: Optional[str] = QueueOpt,
          builds: str = typer.Option("builds", "--builds", help="Where the builds are: a folder of builds (as "
                                     "`build --out` makes them), one build folder, or an artifact store URL "
                                     "(`watch --out`, `build --store`)."),
          host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on; another machine reaches the "
                                   "dashboard only if this is not a loopback address (it has no login)."),
          port: int = typer.Option(8750, "--port", help="Port to listen on (0: any free one).")) -> None:
    """A read-only web dashboard of the job queue and the builds: jobs refreshing live, and per build its file
    table, size-vs-KLD plot, inversions and provenance."""
    from .dashboard.app import DashboardOptions
    from .dashboard.serve import serve as run_dashboard

    run_dashboard(DashboardOptions(queue=queue, builds=builds, host=host, port=port), say=typer.echo)


@app.command()
def worker(queue: Optional[str] = QueueOpt,
           jobs: int = typer.Option(1, "--jobs", "-j", help="Jobs to run at once (within --memory and the GPUs)."),
           once: bool = typer.Option(False, "--once", help="Exit when no job is queued or running (for cron)."),
           lease: float = typer.Option(60, "--lease", help="Seconds a job stays this worker's without a renewal; a "
                                       "dead worker's job is taken over after this."),
           poll: float = typer.Option(5, "--poll", help="Seconds between looks at an empty queue."),
           threads: int = typer.Option(0, "--threads", help="CPU threads per job (0: $QUANTKIT_THREADS or the cores, shared among --jobs)."),
           memory: str = typer.Option("0", "--memory", help="Memory the running jobs' estimates may add up to, e.g. "
                                      "20G (0: 90% of this machine's)."),
           ray: Optional[str] = typer.Option(None, "--ray", help="Run each job's build steps as tasks on this Ray "
                                             "cluster (host:port, ray://host:10001 or auto).", show_default=False),
           store: Optional[str] = StoreOpt) -> None:
    """Run jobs from the queue: each is a `quantkit build` (publishing when the profile says publish.auto)."""
    from .jobs.worker import Worker, WorkerOptions

    memory_bytes = _memory_limit(memory)
    summary = Worker(_queue(queue), WorkerOptions(max_jobs=jobs, lease_s=lease, poll_s=poll, once=once, threads=threads,
                                                  memory_bytes=memory_bytes, ray=ray, store=store)).run()
    typer.echo(f"worker: {len(summary.done)} job(s) done, {len(summary.failed)} failed")
    if summary.failed:
        raise typer.Exit(1)


@app.command()
def sample() -> None:
    """Build (once) the sample fp16 checkpoint and print its folder."""
    from .progress import Reporter
    from .sample import ensure_sample

    typer.echo(ensure_sample(log=Reporter().info))


@app.command("formats")
def list_formats() -> None:
    """List the formats (built in, and from the quantkit.formats entry point) and what each lacks here; a plugin
    that cannot be loaded is listed with its error."""
    from . import formats

    broken = formats.load_errors()
    for name in formats.names():
        if name in broken:
            typer.echo(f"{name:10} broken: {broken[name]}")
            continue
        reqs = formats.get(name).requirements()
        missing = [r for r in reqs if not r.available]
        if missing:
            typer.echo(f"{name:10} missing: " + "; ".join(f"{r.what} ({r.hint})" if r.hint else r.what for r in missing))
        else:
            typer.echo(f"{name:10} available" + (f" ({', '.join(r.what for r in reqs)})" if reqs else ""))


app.command("backends", help="The old name of `quantkit formats`.", hidden=True)(list_formats)


def main() -> None:
    import click

    from .exits import Status, crash_log, fail

    try:
        code = app(standalone_mode=False)  # without standalone mode, click returns typer.Exit's code
        if isinstance(code, int) and code:
            sys.exit(code)
    except QuantkitError as e:
        fail(Status(e.exit_code, str(e), e.hint, e.retryable))
    except KeyboardInterrupt:
        print("interrupted: run the same command again to resume", file=sys.stderr)
        sys.exit(130)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except (click.ClickException, typer.TyperException) as e:  # usage errors (typer 0.29 raises its own click's)
        e.show() if hasattr(e, "show") else print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except (click.exceptions.Abort, typer.Abort):
        sys.exit(1)
    except Exception as e:  # a bug, here or in a plugin: one line for the user, the traceback in a file
        message = (str(e).splitlines() or [""])[0][:300]
        log = crash_log(e)
        fail(Status(1, f"unexpected {type(e).__name__}" + (f": {message}" if message else ""),
                    f"this is a bug: the traceback is in {log}; please include that file in a bug report"))
