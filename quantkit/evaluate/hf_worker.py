"""Child process: evaluate a Hugging Face checkpoint folder with transformers (the fp16 source as the
reference of every format, and GPTQ/AWQ folders through GPTQModel's kernels).

  tokenize:  python -m quantkit.evaluate.hf_worker tokenize FOLDER TEXT_FILE OUT.npy BOS.json
  evaluate:  python -m quantkit.evaluate.hf_worker evaluate FOLDER SPEC.json OUT.json

SPEC is the same as gguf_worker's; `reference: true` loads the weights in float32 (the fp16 source's
values, computed without fp16 rounding on the CPU).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from .chat import smoke_verdict
from .metrics import score, scored_range, worker_main


def tokenize(folder: str, text_file: str, out: str, bos_out: str) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok(Path(text_file).read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
    with open(out, "wb") as f:
        np.save(f, np.asarray(ids, dtype=np.int32))
    # Does this tokenizer put BOS in front of a text? Then every window starts with it, in every runner.
    plain, special = tok("a", add_special_tokens=False)["input_ids"], tok("a")["input_ids"]
    bos = tok.bos_token_id if len(special) > len(plain) and special[0] == tok.bos_token_id else None
    Path(bos_out).write_text(json.dumps({"bos": bos}))


def evaluate(folder: str, spec: dict) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(spec["threads"])
    # The reference: the fp16 weights computed in float32 (CPU fp16 matmuls are slow and round more).
    kwargs = {"dtype": torch.float32} if spec.get("reference") else {"device_map": "cpu"}
    model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    model.eval()
    tok = AutoTokenizer.from_pretrained(folder)
    first, last = scored_range(spec["ctx"])

    def forward(window: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            logits = model(torch.from_numpy(window.astype(np.int64))[None]).logits[0, first:last]
        return logits.float().numpy()

    result = score(forward, spec, model.config.vocab_size)
    result["smoke"] = smoke_test(model, tok, spec["smoke"])
    return result


def smoke_test(model, tok, opts: dict) -> dict:
    import torch

    if not tok.chat_template:
        return {"passed": False, "reply": "", "reason": "the checkpoint has no chat template"}
    messages = [{"role": "system", "content": opts["system"]}, {"role": "user", "content": opts["question"]}]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tok(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos]) | ({tok.eos_token_id} if tok.eos_token_id is not None else set())
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=opts["max_tokens"], do_sample=False, eos_token_id=sorted(eos),
                             pad_token_id=tok.pad_token_id or sorted(eos)[0])
    new = out[0][ids.shape[1]:].tolist()
    end_token = tok.convert_ids_to_tokens(new[-1]) if new and new[-1] in eos else None
    reply = tok.decode(new[:-1] if end_token else new, skip_special_tokens=True)
    return smoke_verdict(reply, end_token, prompt, opts)


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:], {"evaluate": evaluate, "tokenize": tokenize}))
