"""Child process helpers for the EXL2 backend.

  parquet:  python -m quantkit.formats.exl2.tool parquet TEXT_FILE OUT.parquet
            the calibration text as rows (about 2000 characters of whole lines) of a `text`
            column, which exllamav2's converter reads with pandas/fastparquet
"""

from __future__ import annotations

import sys
from pathlib import Path

from quantkit.fsutil import atomic_path


def parquet(text_file: str, out: str) -> None:
    import pandas

    rows, current = [], []
    for line in Path(text_file).read_text(encoding="utf-8").splitlines():
        current.append(line)
        if sum(len(x) for x in current) >= 2000:  # rows of whole lines; exllamav2 joins their tokens anyway
            rows.append("\n".join(current))
            current = []
    rows += ["\n".join(current)] if current else []
    with atomic_path(Path(out)) as tmp:
        pandas.DataFrame({"text": rows}).to_parquet(str(tmp), engine="fastparquet")


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    {"parquet": parquet}[command](*args)
