#!/usr/bin/env python3
"""Regenerate quantkit/data/botchan-{eval,calibration}.txt from the sentencepiece 0.2.3 sdist.

The text is Natsume Soseki's "Botchan", translated by Yasotaro Morri (1919), a public-domain
Project Gutenberg e-book (#8868) that sentencepiece ships as test data. The Gutenberg header,
footer and licence are removed (as that licence allows for public-domain works), and the body
is split at a paragraph boundary into two disjoint parts: evaluation first, calibration after.
Run: python scripts/make_eval_text.py
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

PACKAGE = "sentencepiece==0.2.3"
MEMBER = "sentencepiece-0.2.3/test/botchan.txt"
EVAL_CHARS = 120_000  # 30,930 SmolLM2 tokens: over the 20k the evaluation needs
OUT = Path(__file__).resolve().parent.parent / "quantkit" / "data"


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:", PACKAGE, "-d", tmp],
            check=True,
        )
        sdist = next(Path(tmp).glob("sentencepiece-*.tar.gz"))
        with tarfile.open(sdist) as tar:
            raw = tar.extractfile(MEMBER).read().decode("utf-8-sig")
    lines = raw.replace("\r\n", "\n").split("\n")
    start = next(i for i, l in enumerate(lines) if l.startswith("*** START OF")) + 1
    # The story ends at "--(THE END)--"; the transcriber's list of typos follows it.
    end = next(i for i, l in enumerate(lines) if l.startswith("--(THE END)--")) + 1
    while lines[start].startswith("Produced by") or not lines[start].strip():
        start += 1
    body = "\n".join(lines[start:end]).strip() + "\n"
    # The file has no blank lines between paragraphs; split after a sentence-ending line.
    cut = body.index(".\n", EVAL_CHARS) + 2
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "botchan-eval.txt").write_text(body[:cut], encoding="utf-8")
    (OUT / "botchan-calibration.txt").write_text(body[cut:], encoding="utf-8")
    print(f"eval: {cut} chars, calibration: {len(body) - cut} chars -> {OUT}")


if __name__ == "__main__":
    main()
