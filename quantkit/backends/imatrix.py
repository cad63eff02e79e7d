"""The importance matrix: llama.cpp's own llama-imatrix over the intermediate GGUF, on calibration text
that never overlaps the evaluation text. The file is llama.cpp's imatrix GGUF, published with the quants."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ..evaluate.text import calibration_text
from ..fsutil import atomic_path, write_text_atomic
from ..llamacpp import find_tool
from ..procs import run_program

_CHUNK = re.compile(r"computing over (\d+) chunks|\[(\d+)\]")


def compute_imatrix(model: Path, out: Path, options: dict[str, Any], ctx) -> dict[str, Any]:
    """`options`: ImatrixOptions as a dict (text, chunks, ctx). Returns the facts the report keeps."""
    tool = find_tool("llama-imatrix")
    # llama-imatrix records the text's file name as given (imatrix.datasets), and the file gets published:
    # run it next to the text, under a name that says what the text is, never a local path.
    spec = options["text"]
    name = spec.split(":", 1)[1] + "-calibration" if spec.startswith("builtin:") else Path(spec).stem
    text_file = ctx.out_dir / ".quantkit" / (re.sub(r"[^A-Za-z0-9._-]+", "_", name) + ".txt")
    write_text_atomic(text_file, calibration_text(spec, ctx.evaluation_text))
    n_ctx = int(options["ctx"])
    with ctx.reporter.step(f"importance matrix {out.name} ({options['chunks']} chunks of {n_ctx} tokens)",
                           total=options["chunks"]) as step, atomic_path(out) as tmp:
        def on_line(line: str) -> None:
            for m in _CHUNK.finditer(line):
                if m.group(1):
                    step.update(0, int(m.group(1)))
                else:
                    step.update(int(m.group(2)))

        done = run_program(tool, [
            "-m", str(model), "-f", text_file.name, "-o", str(tmp), "--output-format", "gguf",
            "--chunks", str(options["chunks"]), "-c", str(n_ctx), "-b", str(n_ctx), "-t", str(ctx.threads),
            "--output-frequency", "1000000",  # one write at the end, to our temporary name
        ], on_line=on_line, cwd=text_file.parent, what="llama-imatrix")
    chunks = max((int(m.group(2)) for line in done.lines for m in _CHUNK.finditer(line) if m.group(2)), default=0)
    return {"peak_rss_bytes": done.peak_rss_bytes, "chunks": chunks, "chunk_tokens": n_ctx, "text": options["text"]}
