"""Child process: evaluate one GGUF with llama-cpp-python.

  evaluate:  python -m quantkit.formats.gguf.evaluate_worker evaluate MODEL SPEC.json OUT.json

SPEC holds: tokens (path to .npy), bos (id each window starts with, or null), ctx, threads,
ref_read (path to the reference's log-probabilities), smoke options. Progress goes to stderr as
"progress I/N" lines.
"""

from __future__ import annotations

import sys

import numpy as np

from ...evaluate.chat import CHAT_CTX, chat_turns, render_chat
from ...evaluate.metrics import score, scored_range, worker_main


def _load(model: str, ctx: int, threads: int):
    from pathlib import Path

    from llama_cpp import Llama, llama_supports_gpu_offload

    from .shards import model_file

    # With a CUDA build of llama.cpp (setup.sh makes one where there are a GPU and nvcc), every layer goes to the GPU.
    gpu_layers = -1 if llama_supports_gpu_offload() else 0
    n_ctx = max(ctx, CHAT_CTX)
    return Llama(model_path=str(model_file(Path(model))), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=ctx, n_gpu_layers=gpu_layers,
                 n_threads=threads, n_threads_batch=threads, flash_attn=True, verbose=False)


class Decoder:
    """llama.cpp's decode with logits only for the rows asked for, as llama-perplexity does: the output
    layer (vocabulary-sized) then runs on half of each window, and nothing else is copied."""

    def __init__(self, llm, n_ctx: int) -> None:
        import llama_cpp

        self._c = llama_cpp
        # The raw llama_context of the Llama object (llama-cpp-python is pinned in pyproject.toml).
        self.ctx, self.n_vocab = llm._ctx.ctx, llm.n_vocab()
        self.batch = llama_cpp.llama_batch_init(n_ctx, 0, 1)
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        self.n_past = 0

    def reset(self) -> None:
        self._c.llama_memory_clear(self.memory, True)
        self.n_past = 0

    def decode(self, tokens, first_output: int) -> np.ndarray:
        """Append `tokens`; the logits of positions first_output.. of them (a view, valid until the next call)."""
        b = self.batch
        for i, t in enumerate(tokens):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = int(t), self.n_past + i, 1, i >= first_output
            b.seq_id[i][0] = 0
        b.n_tokens = len(tokens)
        if self._c.llama_decode(self.ctx, b) != 0:
            raise RuntimeError(f"llama_decode failed at position {self.n_past}")
        self.n_past += len(tokens)
        return np.ctypeslib.as_array(self._c.llama_get_logits(self.ctx), shape=(len(tokens) - first_output, self.n_vocab))

    def close(self) -> None:
        self._c.llama_batch_free(self.batch)


def evaluate(model: str, spec: dict) -> dict:
    import llama_cpp

    first, last = scored_range(spec["ctx"])
    llm = _load(model, spec["ctx"], spec["threads"])
    dec = Decoder(llm, llm.n_ctx())

    def forward(window: np.ndarray) -> np.ndarray:
        dec.reset()
        return dec.decode(window, first)[: last - first]

    result = score(forward, spec, llm.n_vocab())
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    template = llm.metadata.get("tokenizer.chat_template")
    piece = lambda t: llm.detokenize([t], special=True).decode("utf-8", errors="replace")  # noqa: E731

    def generate(prompt: str, max_tokens: int, special: bool = True) -> tuple[str, str | None]:
        """Greedy, until an end-of-generation token (llama.cpp's own set) or the cap."""
        ids = llm.tokenize(prompt.encode(), add_bos=False, special=True)
        max_tokens = min(max_tokens, llm.n_ctx() - len(ids))
        if max_tokens <= 0:
            return f"<the prompt has {len(ids)} tokens, more than the {llm.n_ctx()} this check runs with>", None
        dec.reset()
        logits = dec.decode(ids, len(ids) - 1)
        out: list[int] = []
        for _ in range(max_tokens):
            tok = int(np.argmax(logits[-1]))
            if llama_cpp.llama_vocab_is_eog(vocab, tok):
                return llm.detokenize(out, special=special).decode("utf-8", errors="replace"), piece(tok)
            out.append(tok)
            logits = dec.decode([tok], 0)
        return llm.detokenize(out, special=special).decode("utf-8", errors="replace"), None

    def render(messages: list[dict]) -> str:
        return render_chat(template, messages, bos_token=piece(llm.token_bos()), eos_token=piece(llm.token_eos()))

    result |= chat_turns(generate, render if template else None, spec, "the GGUF has no tokenizer.chat_template")
    dec.close()
    return result


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:], {"evaluate": evaluate}))
