"""EXL2's bitrate ladder in one process: python -m quantkit.formats.exl2.ladder SPEC.json

exllamav2's converter is a script (exllamav2/conversion/convert_exl2.py: its arguments, its job file, its steps),
and a process per bitrate paid for torch, exllamav2 and its CUDA extension each time. This child imports them
once and runs that same script for each bitrate (runpy, with the bitrate's command line), so every file is made
by exllamav2's own code, unchanged. The build's environment (CHILD_ENV: causal attention) is this process's.

SPEC.json (written by EXL2Format.build_many):

    {"rates": [{"variant": "4.0bpw-h6", "folder": "OUT/...-exl2-4.0bpw-h6.partial",
                "args": ["-i", VIEW, "-o", WORK, "-nr", "-c", PARQUET, "-m", MEASUREMENT, "-cf", FOLDER,
                         "-b", "4.0", "-hb", "6", "-r", "100", "-l", "2048"]}, ...]}

It prints `quantkit-ladder: loaded in S s` once, then `quantkit-ladder: VARIANT done in S s` or
`quantkit-ladder: VARIANT failed: CAUSE` after each bitrate, and goes on to the next after a failure (the
build keeps what finished). Exit 0 when every bitrate wrote its folder's config.json, 1 when one did not, 3
without a CUDA GPU (nothing is written).
"""

from __future__ import annotations

import gc
import json
import runpy
import sys
import time
import traceback
from pathlib import Path

CONVERTER = "exllamav2.conversion.convert_exl2"
PREFIX = "quantkit-ladder:"


def run_rate(rate: dict) -> str | None:
    """exllamav2's converter for one bitrate; None when it wrote the folder, else why not."""
    sys.argv = [CONVERTER, *rate["args"]]
    try:
        runpy.run_module(CONVERTER, run_name="__main__")
    except SystemExit as e:  # the script's own stops print a " ## Error" line first, and exit 0
        if e.code not in (None, 0):
            return f"exllamav2's converter exited {e.code}"
    except Exception as e:  # noqa: BLE001 - reported, and the next bitrate runs
        traceback.print_exc()
        return f"{type(e).__name__}: {e}"
    finally:
        gc.collect()  # the script's model and hidden states, before the next bitrate's
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if not (Path(rate["folder"]) / "config.json").exists():
        return "it wrote no config.json"
    return None


def main(spec_file: str) -> int:
    rates = json.loads(Path(spec_file).read_text())["rates"]
    start = time.monotonic()
    import torch

    if not torch.cuda.is_available():
        print("error: exllamav2's converter needs a CUDA GPU and torch sees none", file=sys.stderr)
        print("  fix: run the EXL2 steps on a machine with one (or set `if_unavailable: skip` under exl2)",
              file=sys.stderr)
        return 3
    import exllamav2  # noqa: F401 - loads (or compiles) the extension, once for every bitrate

    print(f"{PREFIX} loaded in {time.monotonic() - start:.2f} s", flush=True)
    failed = 0
    for rate in rates:
        begin = time.monotonic()
        why = run_rate(rate)
        if why is None:
            print(f"{PREFIX} {rate['variant']} done in {time.monotonic() - begin:.2f} s", flush=True)
        else:
            failed += 1
            print(f"{PREFIX} {rate['variant']} failed: {why}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print("usage: python -m quantkit.formats.exl2.ladder SPEC.json", file=sys.stderr)
        sys.exit(2)
    sys.exit(main(sys.argv[1]))
