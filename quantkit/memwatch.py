"""Peak anonymous and file-backed resident memory of a running process, sampled from /proc/PID/status.

The kernel's own peak (ru_maxrss) counts both together. Pages of a memory-mapped weight file (RssFile) can be
dropped under pressure and read again from disk; anonymous memory (RssAnon: the heap, torch's tensors,
llama.cpp's buffers) cannot. A step that fits in anonymous memory but not with its file pages still runs, only
slower, so the two are measured apart. Sampled, so a spike shorter than the interval can be missed; on a
system without /proc both stay 0 (not measured).
"""

from __future__ import annotations

import threading
from pathlib import Path

INTERVAL_S = 0.1


def resident(pid: int | str = "self") -> tuple[int, int]:
    """(RssAnon, RssFile) of `pid` now, in bytes; (0, 0) when it cannot be read."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0, 0
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    kib = lambda key: int(fields.get(key, "0 kB").split()[0]) * 1024  # noqa: E731
    return kib("RssAnon"), kib("RssFile")


class MemoryWatch:
    """`with MemoryWatch(pid) as w: ...` samples `pid` (default: this process) until the block ends; then
    `w.peak_anon` and `w.peak_file` are the largest values seen of each (not necessarily at the same moment)."""

    def __init__(self, pid: int | str = "self", interval: float = INTERVAL_S) -> None:
        self.pid, self.interval = pid, interval
        self.peak_anon = self.peak_file = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="memory-watch")

    def __enter__(self) -> "MemoryWatch":
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def facts(self) -> dict[str, int]:
        return {"peak_anon_bytes": self.peak_anon, "peak_file_bytes": self.peak_file}

    def _sample(self) -> None:
        anon, mapped = resident(self.pid)
        self.peak_anon, self.peak_file = max(self.peak_anon, anon), max(self.peak_file, mapped)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()
