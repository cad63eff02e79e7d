"""Child process: evaluate an EXL2 folder with exllamav2 (CUDA only).

  evaluate:   python -m quantkit.formats.exl2.runner evaluate FOLDER SPEC.json OUT.json
  preflight:  python -m quantkit.formats.exl2.runner preflight SOURCE_VIEW SPEC.json OUT.json

Both run with CHILD_ENV (EXLLAMA_NO_SDPA=1), as exllamav2's converter does: exllamav2 0.3.2 without flash-attn
or xformers otherwise attends to future tokens (attention_backend).

The forward pass is exllamav2's; the chat template and decoding come from the folder's own
tokenizer files through transformers, as for the other formats. The loop is evaluate/protocol.py's.
"""

from __future__ import annotations

import sys

import numpy as np

from ...evaluate import causality
from ...evaluate.metrics import scored_range
from ...evaluate.protocol import EvalOutput, EvalSpec, run, runner_main


def attention_backend(config) -> str:
    """The attention exllamav2 runs with, in this process, for `config` (an ExLlamaV2Config): its own order of
    preference, flash-attn, xformers, torch's SDPA, torch's matmul. Its SDPA path has no causal mask outside packed
    batches (attn.py, _attn_torch: get_block_diag_mask is None without cu_seqlens), so quantkit turns it off."""
    import exllamav2.attn as attn

    if attn.has_flash_attn and not config.no_flash_attn:
        return "flash-attn"
    if attn.has_xformers and not config.no_xformers:
        return "xformers"
    if attn.has_lower_right_sdpa and not config.no_sdpa:
        return "torch SDPA (no causal mask)"
    return "torch matmul (causal mask)"


def _load(folder: str, window: int):
    """exllamav2's model of `folder` (an EXL2 folder, or the fp16 source through its view) and its forward:
    token ids -> float32 logits of every position."""
    import torch
    from exllamav2 import ExLlamaV2, ExLlamaV2Cache, ExLlamaV2Config

    config = ExLlamaV2Config(folder)
    config.no_sdpa = True  # as EXLLAMA_NO_SDPA (CHILD_ENV) says, should this process have been started without it
    config.max_seq_len = max(window, 2048)
    # A forward without a cache asserts q_len <= max_input_len (model.py, 2048 by default): a whole window must fit.
    config.max_input_len = config.max_seq_len
    config.max_attention_size = max(config.max_attention_size, config.max_seq_len ** 2)
    model = ExLlamaV2(config)
    cache = ExLlamaV2Cache(model, max_seq_len=config.max_seq_len, lazy=True)
    model.load_autosplit(cache)
    vocab = config.vocab_size  # the head's rows are padded to a multiple of 32 (linear.py, pad32): not tokens

    def logits(ids: list[int] | np.ndarray) -> torch.Tensor:
        with torch.inference_mode():
            return model.forward(torch.tensor(np.asarray(ids, dtype=np.int64))[None]).float()[0, :, :vocab]

    return model, config, logits


class ExLlamaRuntime:
    """protocol.Runtime: exllamav2's forward; the folder's tokenizer files through transformers for the chat turns."""

    name = "exllamav2"
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


def _scored_rows(logits, first: int, last: int):
    """window -> the float32 logits of its scored positions, as numpy (a Runtime's forward)."""
    return lambda window: logits(window)[first:last].cpu().numpy()


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
    model, config, logits = _load(view, spec.window)
    attention = attention_backend(config)

    scored = _scored_rows(logits, first, last)
    # Before anything is compared: a runtime that sees later tokens must stop the build (causality.py).
    causal = causality.measure(f"exllamav2 ({attention})", scored, batches[0], first, last, config.vocab_size).check()
    ours = [log_softmax(scored(w)).astype(np.float16) for w in batches]
    model.unload()  # both models on one GPU at once would double what the check needs
    del model, logits, scored
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
    Path(out_file).write_text(json.dumps(parity.to_dict() | {"windows": len(batches), "attention": attention,
                                                             "causality": causal.to_dict()}))


if __name__ == "__main__":
    sys.exit(runner_main(sys.argv[1:], {"evaluate": evaluate, "preflight": preflight}))
