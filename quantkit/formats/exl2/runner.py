"""Child process: evaluate an EXL2 folder with exllamav2 (CUDA only).

  evaluate:   python -m quantkit.formats.exl2.evaluate_worker evaluate FOLDER SPEC.json OUT.json
  preflight:  python -m quantkit.formats.exl2.evaluate_worker preflight SOURCE_VIEW SPEC.json OUT.json

The forward pass is exllamav2's; the chat template and decoding come from the folder's own
tokenizer files through transformers, as for the other formats.
"""

from __future__ import annotations

import sys

import numpy as np

from ...evaluate.chat import chat_turns
from ...evaluate.metrics import score, scored_range, worker_main


def _load(folder: str, ctx: int):
    """exllamav2's model of `folder` (an EXL2 folder, or the fp16 source through its view) and its forward:
    token ids -> float32 logits of every position."""
    import torch
    from exllamav2 import ExLlamaV2, ExLlamaV2Cache, ExLlamaV2Config

    config = ExLlamaV2Config(folder)
    config.max_seq_len = max(ctx, 2048)
    model = ExLlamaV2(config)
    cache = ExLlamaV2Cache(model, max_seq_len=config.max_seq_len, lazy=True)
    model.load_autosplit(cache)

    def logits(ids: list[int] | np.ndarray) -> torch.Tensor:
        with torch.inference_mode():
            return model.forward(torch.tensor(np.asarray(ids, dtype=np.int64))[None]).float()[0]

    return model, config, logits


def evaluate(folder: str, spec: dict) -> dict:
    from transformers import AutoTokenizer

    _, config, logits = _load(folder, spec["ctx"])
    tok = AutoTokenizer.from_pretrained(folder)
    first, last = scored_range(spec["ctx"])
    result = score(lambda window: logits(window)[first:last].cpu().numpy(), spec, config.vocab_size)
    result |= chat_turns(*chat_functions(logits, tok, folder), spec, "the folder has no chat template")
    return result


def chat_functions(logits, tok, folder: str):
    """(generate, render) for chat_turns: the folder's tokenizer files through transformers, exllamav2's forward."""
    import json
    from pathlib import Path

    gen = Path(folder) / "generation_config.json"
    eos = json.loads(gen.read_text()).get("eos_token_id") if gen.exists() else None
    eos = set(eos if isinstance(eos, list) else [eos] if eos is not None else []) | {tok.eos_token_id}

    def generate(prompt: str, max_tokens: int, special: bool = True) -> tuple[str, str | None]:
        ids = tok(prompt, add_special_tokens=False)["input_ids"]
        out = []
        for _ in range(max_tokens):  # greedy; no cache: a short prompt and reply are cheap on a GPU
            nxt = int(logits(ids + out)[-1].argmax())
            if nxt in eos:
                return tok.decode(out, skip_special_tokens=not special), tok.convert_ids_to_tokens(nxt)
            out.append(nxt)
        return tok.decode(out, skip_special_tokens=not special), None

    from ...evaluate.hf_worker import template_render

    return generate, template_render(tok)


def preflight(view: str, spec_file: str, out_file: str) -> None:
    """The fp16 source through exllamav2 and through the reference (transformers: weights as stored,
    float32 compute) on the first `windows` windows of the evaluation tokens: KL(reference || exllamav2)
    and top-1 agreement, written to OUT as JSON."""
    import gc
    import json
    from pathlib import Path

    import torch

    from ...evaluate.hf_worker import load_model
    from ...evaluate.metrics import Accumulator, log_softmax, windows

    spec = json.loads(Path(spec_file).read_text())
    ctx, first, last = spec["ctx"], *scored_range(spec["ctx"])
    tokens = np.load(spec["tokens"])
    spans = windows(len(tokens), ctx)[: spec.get("windows", 4)]
    batches = []
    for a, b in spans:
        window = tokens[a:b].copy()
        if spec.get("bos") is not None:
            window[0] = spec["bos"]
        batches.append(window)
    model, _, logits = _load(view, ctx)
    ours = [log_softmax(logits(w)[first:last].cpu().numpy()).astype(np.float16) for w in batches]
    model.unload()  # both models on one GPU at once would double what the check needs
    del model, logits
    gc.collect()
    torch.cuda.empty_cache()
    reference, device, _ = load_model(view, {"reference": True})
    keep = torch.arange(first, last, device=device)
    acc = Accumulator()
    for window, lp in zip(batches, ours):
        with torch.inference_mode():
            ref = reference(torch.from_numpy(window.astype(np.int64))[None].to(device), logits_to_keep=keep).logits[0]
        acc.add(lp.astype(np.float32), window[first + 1:], log_softmax(ref.float().cpu().numpy()))
    Path(out_file).write_text(json.dumps(acc.summary() | {"windows": len(batches)}))


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:], {"evaluate": evaluate, "preflight": preflight}))
