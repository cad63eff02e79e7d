"""Child process: evaluate one GGUF with llama-cpp-python.

  evaluate:  python -m quantkit.evaluate.gguf_worker evaluate MODEL SPEC.json OUT.json

SPEC holds: tokens (path to .npy), bos (id each window starts with, or null), ctx, threads,
ref_read (path to the reference's log-probabilities), smoke options. Progress goes to stderr as
"progress I/N" lines.
"""

from __future__ import annotations

import sys

import numpy as np

from .chat import render_chat, smoke_verdict
from .metrics import score, scored_range, worker_main


def _load(model: str, ctx: int, threads: int):
    from pathlib import Path

    from llama_cpp import Llama

    from ..backends.gguf_shards import model_file

    return Llama(model_path=str(model_file(Path(model))), n_ctx=ctx, n_batch=ctx, n_ubatch=ctx, logits_all=True,
                 n_threads=threads, n_threads_batch=threads, verbose=False)


def evaluate(model: str, spec: dict) -> dict:
    import llama_cpp

    first, last = scored_range(spec["ctx"])
    llm = _load(model, spec["ctx"], spec["threads"])

    def forward(window: np.ndarray) -> np.ndarray:
        llm.reset()
        llm.eval(window.tolist())
        return np.asarray(llm.scores[first:last])

    result = score(forward, spec, llm.n_vocab())
    result["smoke"] = smoke_test(llm, llama_cpp.llama_model_get_vocab(llm.model), spec["smoke"])
    return result


def smoke_test(llm, vocab, opts: dict) -> dict:
    """Greedy ChatML-style turn: passes if the model ends its turn before the cap and the reply has the answer."""
    import llama_cpp

    template = llm.metadata.get("tokenizer.chat_template")
    if not template:
        return {"passed": False, "reply": "", "reason": "the GGUF has no tokenizer.chat_template"}
    piece = lambda t: llm.detokenize([t], special=True).decode("utf-8", errors="replace")  # noqa: E731
    messages = [{"role": "system", "content": opts["system"]}, {"role": "user", "content": opts["question"]}]
    prompt = render_chat(template, messages, bos_token=piece(llm.token_bos()), eos_token=piece(llm.token_eos()))
    ids = llm.tokenize(prompt.encode(), add_bos=False, special=True)
    llm.reset()
    llm.eval(ids)
    out: list[int] = []
    end_token = None
    for _ in range(opts["max_tokens"]):
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        if llama_cpp.llama_vocab_is_eog(vocab, tok):
            end_token = piece(tok)
            break
        out.append(tok)
        llm.eval([tok])
    reply = llm.detokenize(out).decode("utf-8", errors="replace")
    return smoke_verdict(reply, end_token, prompt, opts)


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:], {"evaluate": evaluate}))
