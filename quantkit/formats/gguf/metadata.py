"""A GGUF's chat metadata rewritten without touching its tensors: gguf-py's own gguf_new_metadata.py (from the
llama.cpp tree the converter comes from), which copies every tensor as it is and writes new key/values. The copy
goes to a temporary name next to the file and replaces it only when complete."""

from __future__ import annotations

from pathlib import Path

from ...fsutil import atomic_path
from ...procs import run_python
from .llamacpp import find_tree

# The special tokens gguf_new_metadata.py sets by id (tokenizer.ggml.<name>_token_id).
SPECIAL_TOKENS = ("bos", "eos", "eot", "eom", "pad", "unk", "sep", "cls", "mask")


def rewrite_metadata(path: Path, *, template_file: Path | None = None, token_ids: dict[str, int] | None = None,
                     converter: str | None = None) -> None:
    """Give the GGUF at `path` the chat template in `template_file` and the special-token ids in `token_ids`
    ({"eos": 2, ...}), in place. `converter`: the llama.cpp tree (--llama-cpp), as for the build."""
    unknown = set(token_ids or {}) - set(SPECIAL_TOKENS)
    if unknown:
        raise ValueError(f"gguf_new_metadata.py sets no {sorted(unknown)} token")
    script = find_tree(converter).root / "gguf-py" / "gguf" / "scripts" / "gguf_new_metadata.py"
    args = [str(script), str(path)]
    options = ["--force"] + (["--chat-template-file", str(template_file)] if template_file else [])
    for name, token_id in (token_ids or {}).items():
        options += ["--special-token-by-id", name, str(token_id)]
    with atomic_path(path) as tmp:
        run_python(args + [str(tmp)] + options, what="gguf_new_metadata.py")
