"""A BPE tokenizer llama.cpp's converter does not know, refused when the build is planned.

The converter names a BPE model's pre-tokenizer (the `tokenizer.ggml.pre` the runtime splits text with) by a
hash of how the tokenizer encodes a fixed text (conversion/base.py, get_vocab_base_pre); an unknown hash stops
it with "BPE pre-tokenizer was not recognized", after a warning block that prints the hash (`chkhsh:`). The
plan already runs the converter's vocabulary stage on the source (predict.py: the skeleton), so a new model
family that a scheduled job meets first is refused there, before anything is built, instead of deep into a
build: with the hash, and the fix.
"""

from __future__ import annotations

import re

from ...errors import SourceError
from .llamacpp import LlamaCppTree

_REFUSAL = "BPE pre-tokenizer was not recognized"
_HASH = re.compile(r"chkhsh:\s+([0-9a-f]{64})")


class PreTokenizerWatch:
    """An on_line callback for a converter run: whether it refused the pre-tokenizer, and the hash it printed."""

    def __init__(self) -> None:
        self.refused = False
        self.hash: str | None = None

    def __call__(self, line: str) -> None:
        if m := _HASH.search(line):
            self.hash = m.group(1)
        if _REFUSAL in line:
            self.refused = True

    def error(self, model: str, tree: LlamaCppTree) -> SourceError | None:
        """The plan's refusal when the run refused the pre-tokenizer, else None."""
        if not self.refused:
            return None
        origin = "the llama.cpp tree you gave" if tree.version == "user" else f"llama-cpp-python {tree.version}"
        return SourceError(
            f"llama.cpp's converter ({origin}) does not know {model}'s BPE pre-tokenizer (hash {self.hash or 'not printed'}), "
            "so a GGUF of it would split text as no runtime expects",
            "build with a newer llama.cpp that lists this hash in convert_hf_to_gguf's get_vocab_base_pre: "
            "--llama-cpp PATH to its checkout; or leave gguf out of the profile")
