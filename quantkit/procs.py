"""Run a helper process (llama.cpp converter, quantizer or evaluator) and follow its output.

Heavy native work runs in child processes so that a crash in llama.cpp (or a kill) cannot
corrupt the parent's state, and so its log can be read for progress and facts.
"""

from __future__ import annotations

import collections
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from .errors import ToolError
from .memwatch import MemoryWatch


# The Hub credentials a child can find: the variables huggingface_hub reads, and (through HF_TOKEN_PATH) the token
# file `hf auth login` stores. A child that does not talk to the Hub gets none of them, so that the libraries it
# runs (llama.cpp's converter, transformers, GPTQModel, mlx-lm, pip) can neither send nor log a token. This is not
# a sandbox: the child runs as the same user and could read the token file by its default path.
HUB_CREDENTIALS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_ID_TOKEN", "HF_OIDC_RESOURCE")


def child_env(extra: dict[str, str] | None = None, *, hub: bool = False) -> dict[str, str]:
    """This process's environment plus `extra`, for a child process. `hub`: the child talks to the Hub and gets
    the token; otherwise every Hub credential is removed, and huggingface_hub there finds no stored login."""
    env = {**os.environ, **(extra or {})}
    if not hub:
        for key in HUB_CREDENTIALS:
            env.pop(key, None)
        env["HF_TOKEN_PATH"] = os.devnull  # reads as empty: no token
    return env


def _resolve_prctl() -> Callable[[], object] | None:
    """prctl(PR_SET_PDEATHSIG, SIGKILL), looked up in libc now, in the parent: the forked child may only call an
    already-resolved function, since a dlopen or dlsym there can deadlock on a loader lock that another thread of
    the parent held at the fork."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes
    import signal

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # a libc without prctl (not glibc or musl): no parent-death signal
        return None
    sigkill = int(signal.SIGKILL)
    return lambda: prctl(1, sigkill)  # 1 = PR_SET_PDEATHSIG


_SET_PDEATHSIG = _resolve_prctl()


def die_with_parent() -> Callable[[], None] | None:
    """Popen's preexec_fn, made now, in the parent: the kernel kills the child when its parent dies (even by
    kill -9), so a killed build or worker leaves no orphan still writing into the build folder. Linux only;
    elsewhere None (no preexec_fn).

    The contract: start the child and wait for it in the same thread. PR_SET_PDEATHSIG fires when the *thread*
    that forked the child exits, not the process, so a thread that started a child and then ended would kill it.
    run_program starts, reads and reaps its child in one call; jobs.worker.Worker starts and polls its builds in
    the thread that runs Worker.run, which stops them all before it returns."""
    return preexec_for(os.getpid()) if _SET_PDEATHSIG is not None else None


def preexec_for(parent: int) -> Callable[[], None]:
    """The preexec_fn of die_with_parent for a child of process `parent`. A parent that dies between the fork
    and the prctl leaves a child the signal never reaches (it was already reparented); the child sees that in
    its new parent's pid and exits before it runs anything. Only names bound here run in the child: no import,
    no lookup that could dlopen."""
    set_pdeathsig, getppid, exit_now = _SET_PDEATHSIG, os.getppid, os._exit

    def preexec() -> None:
        if set_pdeathsig is not None:
            set_pdeathsig()
        if getppid() != parent:
            exit_now(1)

    return preexec


def stop(proc: subprocess.Popen, grace_s: float) -> None:
    """SIGTERM, then SIGKILL if the child has not exited after `grace_s` seconds; reaped either way."""
    proc.terminate()
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@dataclass(frozen=True)
class Finished:
    lines: list[str]  # stdout and stderr, merged, one entry per line (or per tqdm redraw)
    peak_rss_bytes: int  # the child's own peak resident memory, from the kernel's accounting
    peak_anon_bytes: int = 0  # its peak anonymous memory, sampled (memwatch.MemoryWatch)
    peak_file_bytes: int = 0  # its peak of resident pages of memory-mapped files, sampled

    def memory(self) -> dict[str, int]:
        """The facts a build step reports of its memory (results.Built's peak_* fields)."""
        return {"peak_rss_bytes": self.peak_rss_bytes, "peak_anon_bytes": self.peak_anon_bytes,
                "peak_file_bytes": self.peak_file_bytes}


def run_python(args: Sequence[str], **kwargs) -> Finished:
    """Run `python args...` (this interpreter); see run_program."""
    return run_program(sys.executable, args, **kwargs)


def run_program(program: str | Path, args: Sequence[str], *, on_line: Callable[[str], None] | None = None,
                cwd: Path | None = None, env: dict[str, str] | None = None, what: str = "helper",
                hub: bool = False) -> Finished:
    """Run `program args...`, merging stdout and stderr; raise ToolError on failure. `hub`: the child talks to
    the Hub, and gets the Hub token (child_env); by default it gets none. The child is started, read and reaped
    in this one call, in the caller's thread, as die_with_parent requires (whatever thread calls it)."""
    # Children import the same quantkit as this process, whatever their working directory.
    here = str(Path(__file__).resolve().parent.parent)
    pythonpath = os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH", "")) if p)
    full_env = child_env({"PYTHONUNBUFFERED": "1", "PYTHONPATH": pythonpath, **(env or {})}, hub=hub)
    lines: list[str] = []
    tail: collections.deque[str] = collections.deque(maxlen=15)
    proc = subprocess.Popen([str(program), *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            cwd=cwd, env=full_env, text=True, errors="replace", bufsize=1,
                            preexec_fn=die_with_parent())
    assert proc.stdout is not None
    with MemoryWatch(proc.pid) as watch:
        try:
            for raw in proc.stdout:
                # tqdm redraws with \r; each redraw is a progress line of its own.
                for line in raw.rstrip("\n").split("\r"):
                    if line:
                        lines.append(line)
                        tail.append(line)
                        if on_line:
                            on_line(line)
            # wait4, not wait: it gives this child's own rusage (peak RSS), which backends report as measured memory.
            _, status, usage = os.wait4(proc.pid, 0)
            code = proc.returncode = os.waitstatus_to_exitcode(status)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
    if code != 0:
        cause = next((l for l in reversed(tail) if "error" in l.lower()), tail[-1] if tail else "")
        how = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
        raise ToolError(f"{what} failed ({how}): {cause.strip()[:300]}", "the last lines of its output:\n" + "\n".join(tail))
    return Finished(lines, usage.ru_maxrss * 1024, watch.peak_anon, watch.peak_file)
