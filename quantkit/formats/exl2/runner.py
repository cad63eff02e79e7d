"""Child process: evaluate an EXL2 folder with exllamav2 (CUDA only).

  evaluate:   python -m quantkit.formats.exl2.runner evaluate FOLDER SPEC.json OUT.json
  preflight:  python -m quantkit.formats.exl2.runner preflight SOURCE_VIEW SPEC.json OUT.json

The forward pass is exllamav2's; the chat template and decoding come from the folder's own
tokenizer files through transformers, as for the other formats. The loop is evaluate/protocol.py's.
"""

from __future__ import annotations

import sys

import numpy as np

from ...evaluate.metrics import scored_range
from ...evaluate.protocol import EvalOutput, EvalSpec, run, runner_main


def _load(folder: str, window: int):
    """exllamav2's model of `folder` (an EXL2 folder, or the fp16 source through its view) and its forward:
    token ids -> float32 logits of every position."""
    import torch
    from exllamav2 import ExLlamaV2, ExLlamaV2Cache, ExLlamaV2Config

    config = ExLlamaV2Config(folder)
    config.max_seq_len = max(window, 2048)
    model = ExLlamaV2(config)
    cache = ExLlamaV2Cache(model, max_seq_len=config.max_seq_len, lazy=True)
    model.load_autosplit(cache)

    def logits(ids: list[int] | np.ndarray) -> torch.Tensor:
        with torch.inference_mode():
            return model.forward(torch.tensor(np.asarray(ids, dtype=np.int64))[None]).float()[0]

    return model, config, logits


class ExLlamaRuntime:
    """protocol.Runtime: exllamav2's forward; the folder's tokenizer files through transformers for the chat turns."""

    no_template = "the folder has no chat template"

    def __init__(self, folder: str, spec: EvalSpec) -> None:
        import json
        from pathlib import Path

        from transformers import AutoTokenizer

        from ...evaluate.hf_runner import template_render

        _, config, self.logits = _load(folder, spec.window)
        self.vocab_size = config.vocab_size
        self.first, self.last = scored_range(spec.window)
        self.tok = AutoTokenizer.from_pretrained(folder)
        self.render = template_render(self.tok)
        gen = Path(folder) / "generation_config.json"
        eos = json.loads(gen.read_text()).get("eos_token_id") if gen.exists() else None
        self.eos = set(eos if isinstance(eos, list) else [eos] if eos is not None else []) | {self.tok.eos_token_id}

    def forward(self, window: np.ndarray) -> np.ndarray:
        return self.logits(window)[self.first:self.last].cpu().numpy()

    def generate(self, turns: list[tuple[str, int, bool]]) -> list[tuple[str, str | None]]:
        return [self._generate(*turn) for turn in turns]

    def _generate(self, prompt: str, max_tokens: int, special: bool = True) -> tuple[str, str | None]:
        tok = self.tok
        ids = tok(prompt, add_special_tokens=False)["input_ids"]
        out = []
        for _ in range(max_tokens):  # greedy; no cache: a short prompt and reply are cheap on a GPU
            nxt = int(self.logits(ids + out)[-1].argmax())
            if nxt in self.eos:
                return tok.decode(out, skip_special_tokens=not special), tok.convert_ids_to_tokens(nxt)
            out.append(nxt)
        return tok.decode(out, skip_special_tokens=not special), None


def evaluate(folder: str, spec: EvalSpec) -> EvalOutput:
    return run(ExLlamaRuntime(folder, spec), spec)


def preflight(view: str, spec_file: str, out_file: str) -> None:
    """The fp16 source through exllamav2 and through the reference (transformers: weights as stored,
    float32 compute) on the first `windows` windows (4 by default) of the evaluation tokens: its Parity
    (KL(reference || exllamav2) and top-1 agreement), written to OUT as JSON."""
    import gc
    import json
    from pathlib import Path

    import torch

    from ...evaluate.hf_runner import load_model
    from ...evaluate.metrics import log_softmax
    from ...evaluate.parity import Parity

    spec = EvalSpec.from_json(json.loads(Path(spec_file).read_text()))
    first, last = scored_range(spec.window)
    text = spec.window_ids()
    batches = [text[i] for i in range(min(spec.windows or 4, len(text)))]
    model, _, logits = _load(view, spec.window)
    ours = [log_softmax(logits(w)[first:last].cpu().numpy()).astype(np.float16) for w in batches]
    model.unload()  # both models on one GPU at once would double what the check needs
    del model, logits
    gc.collect()
    torch.cuda.empty_cache()
    reference, device, _ = load_model(view, {"reference": True})
    keep = torch.arange(first, last, device=device)

    def reference_rows():  # a window at a time, as the comparison takes them
        for window in batches:
            with torch.inference_mode():
                ids = torch.from_numpy(window.astype(np.int64))[None].to(device)
                yield log_softmax(reference(ids, logits_to_keep=keep).logits[0].float().cpu().numpy())

    parity = Parity.measure("exllamav2, fp16 source", reference_rows(), ours)
    Path(out_file).write_text(json.dumps(parity.to_dict() | {"windows": len(batches)}))


if __name__ == "__main__":
    sys.exit(runner_main(sys.argv[1:], {"evaluate": evaluate, "preflight": preflight}))
