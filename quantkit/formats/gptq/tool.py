"""Child process: quantize one GPTQ or AWQ variant with GPTQModel.

Usage: python -m quantkit.formats.gptq.tool SPEC.json
SPEC: method (gptq|awq), source, out, bits, group_size, desc_act, sym, calibration {text, samples, seq_len, file}:
`file`, the calibration text the build process read (a Hub dataset is fetched there, with the token: not here).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from ...cpus import usable_cpus
from ...fsutil import drop_local_paths


def calibration_texts(source: str, spec: dict) -> list[str]:
    """`samples` consecutive slices of `seq_len` tokens of the calibration text (never the evaluation text)."""
    from transformers import AutoTokenizer

    text = Path(spec["file"]).read_text(encoding="utf-8")
    tok = AutoTokenizer.from_pretrained(source)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    n, size = spec["samples"], spec["seq_len"]
    if len(ids) < size:
        raise SystemExit(f"error: the calibration text has {len(ids)} tokens, fewer than seq_len {size}")
    return [tok.decode(ids[i * size:(i + 1) * size]) for i in range(min(n, len(ids) // size))]


def main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    threads = spec.get("threads") or usable_cpus()
    # GPTQModel's pool of CPU workers lends two to its model loader and refuses a pool of one ("Virtual pool
    # 'model_loader:cpu' requests 2 workers but parent 'cpu' only has 1"); torch's own threads do the arithmetic.
    os.environ["GPTQMODEL_CPU_WORKERS"] = str(max(2, threads))
    import torch

    torch.set_num_threads(threads)
    from gptqmodel import GPTQModel, QuantizeConfig
    from gptqmodel.quantization.config import FORMAT, METHOD

    texts = calibration_texts(spec["source"], spec["calibration"])
    if spec["method"] == "awq":
        qc = QuantizeConfig(bits=spec["bits"], group_size=spec["group_size"], quant_method=METHOD.AWQ, format=FORMAT.GEMM)
    else:
        qc = QuantizeConfig(bits=spec["bits"], group_size=spec["group_size"], desc_act=spec["desc_act"], sym=spec["sym"])
    print(f"progress 0/3 calibrating on {len(texts)} samples", flush=True)
    model = GPTQModel.load(spec["source"], qc, device="cpu")
    print("progress 1/3", flush=True)
    model.quantize(texts, batch_size=1)
    print("progress 2/3", flush=True)
    model.save(spec["out"])
    # GPTQModel records its temporary offload folder (a local path) in quantize_config.json.
    for name in ("quantize_config.json", "config.json"):
        drop_local_paths(Path(spec["out"]) / name)
    print("progress 3/3", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
