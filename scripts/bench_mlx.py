#!/usr/bin/env python3
"""MLX on this machine's CPU: can it score text? The sample's 4-bit folder (made by mlx-lm's converter) run
by MLX as it is (quantized matmuls, 16-bit scales and activations), by MLX quantized with its scales and
activations in float32 (what quantkit's smoke test and runtime check run), by MLX with its layers dequantized
to 16 bits, and, as the baseline in the same run, by transformers on the same dequantized weights (what
quantkit's MLX evaluation scores). Prints the
time per token of each on the same token ids and the ratios against the baseline. Tokens: --quantized for the
first (it is slow), --tokens for the others.

Usage: .venv/bin/python scripts/bench_mlx.py [--quantized 8] [--tokens 512] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from quantkit.evaluate.text import BUILTIN  # noqa: E402
from quantkit.sample import ensure_sample  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quantized", type=int, default=8, help="tokens for the quantized MLX run (6 s a token here)")
    ap.add_argument("--tokens", type=int, default=512, help="tokens for the dequantized MLX and transformers runs")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()

    import mlx.core as mx
    import torch
    from mlx.utils import tree_flatten
    from mlx_lm import load
    from mlx_lm.utils import dequantize_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    sample = ensure_sample()
    ids = AutoTokenizer.from_pretrained(sample)(BUILTIN["botchan"].read_text(), add_special_tokens=False)["input_ids"]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "mlx-4bit"
        subprocess.run([sys.executable, "-m", "mlx_lm", "convert", "--hf-path", str(sample), "--mlx-path", str(folder),
                        "-q", "--q-bits", "4", "--q-group-size", "64"], check=True, capture_output=True)
        model, _ = load(str(folder))

        def mlx_run(n: int) -> float:
            start = time.monotonic()
            mx.eval(model(mx.array(ids[:n])[None]))
            return (time.monotonic() - start) / n

        mlx_run(1)  # first call: kernels and buffers
        quantized = mlx_run(args.quantized)
        model.set_dtype(mx.float32)  # scales, biases and norms; the packed weights stay 4-bit
        mlx_run(1)
        quantized_f32 = mlx_run(args.tokens)
        model, _ = load(str(folder))
        model = dequantize_model(model)
        mx.eval(model.parameters())
        mlx_run(1)
        dequantized = mlx_run(args.tokens)

        ckpt = Path(tmp) / "ckpt"
        ckpt.mkdir()
        mx.save_safetensors(str(ckpt / "model.safetensors"), dict(tree_flatten(model.parameters())), metadata={"format": "pt"})
        config = json.loads((folder / "config.json").read_text())
        for key in ("quantization", "quantization_config"):
            config.pop(key)
        (ckpt / "config.json").write_text(json.dumps(config))
        hf = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
        x = torch.tensor([ids[:args.tokens]])
        with torch.inference_mode():
            hf(x[:, :8])
            start = time.monotonic()
            hf(x)
            baseline = (time.monotonic() - start) / args.tokens
    print(f"transformers, float32, dequantized weights ({args.tokens} tokens): {baseline * 1000:8.1f} ms a token  (baseline)")
    print(f"MLX, dequantized to 16 bits ({args.tokens} tokens):          {dequantized * 1000:8.1f} ms a token  "
          f"{dequantized / baseline:7.1f}x the baseline")
    print(f"MLX, 4-bit as published ({args.quantized} tokens):                {quantized * 1000:8.1f} ms a token  "
          f"{quantized / baseline:7.1f}x the baseline")
    print(f"MLX, 4-bit, float32 scales and activations ({args.tokens} tokens): {quantized_f32 * 1000:8.1f} ms a token  "
          f"{quantized_f32 / baseline:7.1f}x the baseline")
    print(f"one 512-token window: transformers {512 * baseline:.1f} s, MLX dequantized {512 * dequantized:.0f} s, "
          f"MLX 4-bit {512 * quantized / 60:.0f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
