"""The importance matrix: llama.cpp's own llama-imatrix over the intermediate GGUF, on calibration text
that never overlaps the evaluation text. The file is llama.cpp's imatrix GGUF, published with the quants."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ...evaluate.text import calibration_text
from ...fsutil import atomic_path, write_text_atomic
from .llamacpp import find_tool
from ...procs import run_program

_CHUNK = re.compile(r"computing over (\d+) chunks|\[(\d+)\]")


def compute_imatrix(model: Path, out: Path, options: dict[str, Any], context) -> dict[str, Any]:
    """`options`: ImatrixOptions as a dict (text, chunks, ctx). Returns the facts the report keeps."""
    tool = find_tool("llama-imatrix")
    # llama-imatrix records the text's file name as given (imatrix.datasets), and the file gets published:
    # run it next to the text, under a name that says what the text is, never a local path.
    spec = options["text"]
    name = spec.split(":", 1)[1] + "-calibration" if spec.startswith("builtin:") else Path(spec).stem
    text_file = context.out_dir / ".quantkit" / (re.sub(r"[^A-Za-z0-9._-]+", "_", name) + ".txt")
    write_text_atomic(text_file, calibration_text(spec, context.evaluation_text))
    n_ctx = int(options["ctx"])
    with context.reporter.step(f"importance matrix {out.name} ({options['chunks']} chunks of {n_ctx} tokens)",
                           total=options["chunks"]) as step, atomic_path(out) as tmp:
        def on_line(line: str) -> None:
            for m in _CHUNK.finditer(line):
                if m.group(1):
                    step.update(0, int(m.group(1)))
                else:
                    step.update(int(m.group(2)))

        done = run_program(tool, [
            "-m", str(model), "-f", text_file.name, "-o", str(tmp), "--output-format", "gguf",
            "--chunks", str(options["chunks"]), "-c", str(n_ctx), "-b", str(n_ctx), "-t", str(context.threads),
            "--output-frequency", "1000000",  # one write at the end, to our temporary name
        ], on_line=on_line, cwd=text_file.parent, what="llama-imatrix")
    chunks = max((int(m.group(2)) for line in done.lines for m in _CHUNK.finditer(line) if m.group(2)), default=0)
    idle = experts_without_data(out)
    if idle:
        context.reporter.warn(f"importance matrix: {describe_idle(idle)} saw no calibration token; llama.cpp quantizes "
                          "them without importance weights (its partial-data path). For better i-quants of them, "
                          "calibrate on more or more varied text (imatrix.chunks, imatrix.text)")
    return {**done.memory(), "chunks": chunks, "chunk_tokens": n_ctx, "text": options["text"],
            "experts_without_data": idle}


def experts_without_data(imatrix: Path) -> dict[str, list[int]]:
    """{layer: [expert, ...]} for the MoE experts that calibration never routed a token to. llama-imatrix
    keeps a token count per expert (NAME.counts); a zero means that expert's weights got no statistics."""
    from gguf import GGUFReader

    idle: dict[str, set[int]] = {}
    for t in GGUFReader(imatrix).tensors:
        if t.name.endswith(".counts") and int(t.n_elements) > 1:
            zeros = [i for i, c in enumerate(t.data.reshape(-1)) if c == 0]
            if zeros:
                idle.setdefault(t.name.split(".")[1], set()).update(zeros)  # blk.N.ffn_up_exps.weight.counts
    return {layer: sorted(e) for layer, e in sorted(idle.items(), key=lambda kv: int(kv[0]))}


def describe_idle(idle: dict[str, list[int]]) -> str:
    """'experts 6, 7 of layers 0-3' (or per layer when they differ)."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for layer, experts in idle.items():
        groups.setdefault(tuple(experts), []).append(int(layer))
    parts = []
    for experts, layers in groups.items():
        span = f"{layers[0]}-{layers[-1]}" if len(layers) > 1 and layers == list(range(layers[0], layers[-1] + 1)) \
            else ", ".join(map(str, layers))
        parts.append(f"expert{'s' * (len(experts) > 1)} {', '.join(map(str, experts))} of layer{'s' * (len(layers) > 1)} {span}")
    return "; ".join(parts)
