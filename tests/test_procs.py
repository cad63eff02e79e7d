"""Child processes die with their parent (procs.die_with_parent), even one whose parent is killed between the fork
and the prctl that asks for the signal. Real processes; tests/test_publish_safety.py has the plain kill -9 case."""

import subprocess
import sys
import textwrap

import pytest

from conftest import REPO

# A grandparent that adopts orphans (PR_SET_CHILD_SUBREAPER), a parent it forks and kills with SIGKILL while the
# parent's child sleeps in its preexec_fn before die_with_parent's prctl: the window where the parent-death
# signal can never come. The grandparent reaps the orphan and prints its exit code and whether it ran its program.
_ORPHAN = textwrap.dedent("""
    import ctypes, os, signal, subprocess, sys, time
    from quantkit.procs import die_with_parent

    marker = sys.argv[1]
    assert ctypes.CDLL(None).prctl(36, 1) == 0  # PR_SET_CHILD_SUBREAPER
    parent = os.fork()
    if parent == 0:
        preexec = die_with_parent()

        def late():
            time.sleep(1.0)  # the parent is killed meanwhile
            preexec()

        subprocess.Popen([sys.executable, "-c", f"open({marker!r}, 'w').close()"], preexec_fn=late)
        os._exit(0)
    time.sleep(0.3)
    os.kill(parent, signal.SIGKILL)
    os.waitpid(parent, 0)
    _, status = os.wait()  # the orphan, reparented to this process
    print(os.waitstatus_to_exitcode(status), os.path.exists(marker))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_child_whose_parent_died_before_the_prctl_never_runs(tmp_path):
    marker = tmp_path / "ran"
    proc = subprocess.run([sys.executable, "-c", _ORPHAN, str(marker)], cwd=REPO, capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["1", "False"]  # exited at once, its program never started
    assert not marker.exists()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_child_whose_parent_lives_runs():
    from quantkit.procs import run_python

    assert run_python(["-c", "print('ran')"]).lines == ["ran"]
