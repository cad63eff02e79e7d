"""Split GGUF files: llama.cpp's shard layout (NAME-00001-of-0000N.gguf), which llama.cpp and LM Studio load
from the first shard; Ollama cannot pull one (ollama#5245). quantkit keeps the shards of one artifact in a folder."""

from __future__ import annotations

from pathlib import Path

from .llamacpp import find_tool
from ...procs import Finished, run_program


def model_file(path: Path) -> Path:
    """The file llama.cpp opens: the artifact itself, or the first shard of a split artifact's folder."""
    if path.is_dir():
        shards = sorted(path.glob("*-00001-of-*.gguf"))
        if not shards:
            raise FileNotFoundError(f"{path} holds no first shard (*-00001-of-*.gguf)")
        return shards[0]
    return path


def gguf_files(path: Path) -> list[Path]:
    return sorted(path.glob("*.gguf")) if path.is_dir() else [path]


def split(src: Path, folder: Path, prefix: str, max_bytes: int) -> Finished:
    """llama-gguf-split: shards of at most `max_bytes` (whole megabytes, as the tool takes them)."""
    tool = find_tool("llama-gguf-split")
    args = ["--split", "--split-max-size", f"{max(1, max_bytes // 1_000_000)}M", str(src), str(folder / prefix)]
    return run_program(tool, args, what="llama-gguf-split")
