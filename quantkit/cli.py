"""The `quantkit` command: a thin layer over quantkit.build and friends."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from . import __version__
from .errors import QuantkitError

app = typer.Typer(help="Turn a Hugging Face fp16 checkpoint into a checked set of quantized models.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)

SourceArg = typer.Argument(None, help="Hub repo id (ORG/MODEL) or a local checkpoint folder.", show_default=False)
SampleOpt = typer.Option(False, "--sample", help="Use the bundled sample model (SmolLM2-135M-Instruct, built offline).")
ProfileOpt = typer.Option(None, "--profile", "-p", help="Profile name (see profiles/) or a YAML file "
                          "[default: gguf-standard; sample with --sample].", show_default=False)
OutOpt = typer.Option(Path("builds"), "--out", "-o", help="Parent folder; the build goes into OUT/<Model>/.")
RevisionOpt = typer.Option(None, "--revision", help="Branch, tag or commit of a Hub repo.")
PickleOpt = typer.Option(False, "--allow-pickle", help="Accept .bin/.pt weights (unpickling can run code).")
RemoteOpt = typer.Option(False, "--trust-remote-code", help="Accept models that need code from their repo.")
LlamaOpt = typer.Option(None, "--llama-cpp", help="A llama.cpp checkout whose converter to use (default: the one "
                        "matching the installed llama-cpp-python).", envvar="QUANTKIT_LLAMA_CPP")


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
    return source, profile or "gguf-standard"


@app.command()
def plan(source: Optional[str] = SourceArg, sample: bool = SampleOpt, profile: Optional[str] = ProfileOpt, out: Path = OutOpt,
         revision: Optional[str] = RevisionOpt, allow_pickle: bool = PickleOpt, trust_remote_code: bool = RemoteOpt,
         llama_cpp: Optional[str] = LlamaOpt) -> None:
    """Show what `build` would make, and the disk it needs, without building anything."""
    from .build import make_plan
    from .progress import Reporter

    reporter = Reporter()
    p = make_plan(*_source(source, sample, profile, reporter), out, revision=revision, allow_pickle=allow_pickle,
                  trust_remote_code=trust_remote_code, llama_cpp=llama_cpp)
    typer.echo(p.render())


@app.command()
def build(source: Optional[str] = SourceArg, sample: bool = SampleOpt, profile: Optional[str] = ProfileOpt, out: Path = OutOpt,
          revision: Optional[str] = RevisionOpt, allow_pickle: bool = PickleOpt, trust_remote_code: bool = RemoteOpt,
          llama_cpp: Optional[str] = LlamaOpt,
          threads: int = typer.Option(0, "--threads", help="CPU threads (0: all cores)."),
          publish_: bool = typer.Option(False, "--publish", help="Publish to the Hub when the build succeeds."),
          owner: Optional[str] = typer.Option(None, "--owner", help="Hub user or organisation to publish under."),
          quiet: bool = typer.Option(False, "--quiet", "-q", help="Only warnings and errors.")) -> None:
    """Convert, quantize and evaluate every artifact of a profile; re-running resumes."""
    from .build import make_plan, run_build
    from .progress import Reporter

    reporter = Reporter(quiet=quiet)
    p = make_plan(*_source(source, sample, profile, reporter), out, revision=revision, allow_pickle=allow_pickle,
                  trust_remote_code=trust_remote_code, llama_cpp=llama_cpp)
    reporter.info(p.render())
    result = run_build(p, reporter=reporter, threads=threads or None, llama_cpp=llama_cpp)
    typer.echo(Path(result.report_md).read_text().split("\n## ")[0].rstrip())
    typer.echo(f"\nbuilt {len(result.built)}, evaluated {len(result.evaluated)} in {result.seconds:.1f}s -> {p.out_dir}")
    if publish_:
        _publish(p.out_dir, owner=owner, dry_run=False, reporter=reporter)


@app.command()
def publish(build_dir: Path = typer.Argument(..., help="A build folder (OUT/<Model>) with report.json."),
            owner: Optional[str] = typer.Option(None, "--owner", help="Hub user or organisation [default: the "
                                                "profile's publish.owner, else the token's user]."),
            dry_run: bool = typer.Option(False, "--dry-run", help="Print the commit plan; no network.")) -> None:
    """Publish a build: model card, plot and files to one Hub repo per format (HF_TOKEN or `hf auth login`)."""
    from .progress import Reporter

    _publish(build_dir, owner=owner, dry_run=dry_run, reporter=Reporter())


def _publish(build_dir: Path, *, owner: Optional[str], dry_run: bool, reporter) -> None:
    from .publish.hub import plan_publish, publish as push

    commits = plan_publish(build_dir, owner=owner, offline=dry_run)
    for c in commits:
        typer.echo(c.render())
    if dry_run:
        typer.echo("dry run: nothing was uploaded")
        return
    for r in push(commits, reporter=reporter):
        state = f"new commit {r.commit}" if r.commit else f"up to date at {r.head}"
        typer.echo(f"{r.repo_id}@{r.branch}: {state}")


@app.command()
def sample() -> None:
    """Build (once) the sample fp16 checkpoint and print its folder."""
    from .progress import Reporter
    from .sample import ensure_sample

    typer.echo(ensure_sample(log=Reporter().info))


@app.command("backends")
def list_backends() -> None:
    """List the registered backends (built in and from the quantkit.backends entry point) and what each lacks."""
    from . import backends

    for name in backends.names():
        reqs = backends.get(name).requirements()
        missing = [r for r in reqs if not r.available]
        if missing:
            typer.echo(f"{name:10} missing: " + "; ".join(f"{r.what} ({r.hint})" if r.hint else r.what for r in missing))
        else:
            typer.echo(f"{name:10} available" + (f" ({', '.join(r.what for r in reqs)})" if reqs else ""))


def main() -> None:
    try:
        app(standalone_mode=False)
    except QuantkitError as e:
        print(f"error: {e}", file=sys.stderr)
        if e.hint:
            print(f"  fix: {e.hint}", file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        print("interrupted: run the same command again to resume", file=sys.stderr)
        sys.exit(130)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except Exception as e:  # click usage errors
        import click

        if isinstance(e, click.ClickException):
            e.show()
            sys.exit(e.exit_code)
        if isinstance(e, click.exceptions.Abort):
            sys.exit(1)
        raise
