"""Child process: evaluate an EXL2 folder with exllamav2 (CUDA only).

  evaluate:  python -m quantkit.evaluate.exl2_worker evaluate FOLDER SPEC.json OUT.json

The forward pass is exllamav2's; the chat template and decoding come from the folder's own
tokenizer files through transformers, as for the other formats.
"""

from __future__ import annotations

import sys

import numpy as np

from .chat import smoke_verdict
from .metrics import score, scored_range, worker_main


def evaluate(folder: str, spec: dict) -> dict:
    import torch
    from exllamav2 import ExLlamaV2, ExLlamaV2Cache, ExLlamaV2Config
    from transformers import AutoTokenizer

    config = ExLlamaV2Config(folder)
    config.max_seq_len = max(spec["ctx"], 2048)
    model = ExLlamaV2(config)
    cache = ExLlamaV2Cache(model, max_seq_len=config.max_seq_len, lazy=True)
    model.load_autosplit(cache)
    tok = AutoTokenizer.from_pretrained(folder)
    first, last = scored_range(spec["ctx"])

    def logits(ids: list[int] | np.ndarray) -> torch.Tensor:
        with torch.inference_mode():
            return model.forward(torch.tensor(np.asarray(ids, dtype=np.int64))[None]).float()[0]

    result = score(lambda window: logits(window)[first:last].cpu().numpy(), spec, config.vocab_size)
    result["smoke"] = smoke_test(logits, tok, folder, spec["smoke"])
    return result


def smoke_test(logits, tok, folder: str, opts: dict) -> dict:
    import json
    from pathlib import Path

    if not tok.chat_template:
        return {"passed": False, "reply": "", "reason": "the folder has no chat template"}
    messages = [{"role": "system", "content": opts["system"]}, {"role": "user", "content": opts["question"]}]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    gen = Path(folder) / "generation_config.json"
    eos = json.loads(gen.read_text()).get("eos_token_id") if gen.exists() else None
    eos = set(eos if isinstance(eos, list) else [eos] if eos is not None else []) | {tok.eos_token_id}
    out, end_token = [], None
    for _ in range(opts["max_tokens"]):  # greedy; no cache: 48 tokens of a short prompt are cheap on a GPU
        nxt = int(logits(ids + out)[-1].argmax())
        if nxt in eos:
            end_token = tok.convert_ids_to_tokens(nxt)
            break
        out.append(nxt)
    return smoke_verdict(tok.decode(out, skip_special_tokens=True), end_token, prompt, opts)


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:], {"evaluate": evaluate}))
