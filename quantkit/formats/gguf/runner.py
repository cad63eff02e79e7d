"""Child process: evaluate one GGUF with llama-cpp-python (a protocol.Runtime; the loop is evaluate/protocol.py).

  evaluate:  python -m quantkit.formats.gguf.runner evaluate MODEL SPEC.json OUT.json

SPEC is evaluate/protocol.py's EvalSpec; windows_per_decode (default WINDOWS_PER_DECODE) is this runner's own.

The text is scored as llama-perplexity scores it: several windows per decode, each its own sequence in the
KV cache (n_seq = n_batch / n_ctx there; 2048 / 512 = 4 by default), so the weights are read once for all of
them. A GGUF larger than free memory, whose pages the kernel drops and reads again, is then read once per
group of windows, not once per window. One micro-batch holds the whole group (n_ubatch = n_batch): with
llama.cpp's default n_ubatch of 512, each window would still be a weight pass of its own.
"""

from __future__ import annotations

import sys
from collections import deque

import numpy as np

from ...evaluate.chat import CHAT_CTX, render_chat
from ...evaluate.metrics import scored_range
from ...evaluate.protocol import EvalOutput, EvalSpec, run, runner_main

WINDOWS_PER_DECODE = 4  # llama-perplexity's default: n_batch 2048 over windows of 512


def _load(model: str, window: int, threads: int):
    from pathlib import Path

    from llama_cpp import Llama, llama_supports_gpu_offload

    from .shards import model_file

    # With a CUDA build of llama.cpp (setup.sh makes one where there are a GPU and nvcc), every layer goes to the GPU.
    gpu_layers = -1 if llama_supports_gpu_offload() else 0
    n_ctx = max(window, CHAT_CTX)
    return Llama(model_path=str(model_file(Path(model))), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=window, n_gpu_layers=gpu_layers,
                 n_threads=threads, n_threads_batch=threads, flash_attn=True, verbose=False)


class Decoder:
    """llama.cpp's decode with logits only for the rows asked for, as llama-perplexity does: the output
    layer (vocabulary-sized) then runs on half of each window, and nothing else is copied."""

    def __init__(self, ctx, n_vocab: int, n_tokens: int, own: bool = False) -> None:
        import llama_cpp

        self._c, self.ctx, self.n_vocab, self.own = llama_cpp, ctx, n_vocab, own
        self.batch = llama_cpp.llama_batch_init(n_tokens, 0, 1)
        self.memory = llama_cpp.llama_get_memory(ctx)
        self.n_past = 0

    @classmethod
    def of(cls, llm) -> "Decoder":
        """On the Llama object's own context (the raw llama_context; llama-cpp-python is pinned in pyproject.toml)."""
        return cls(llm._ctx.ctx, llm.n_vocab(), llm.n_ctx())

    @classmethod
    def for_windows(cls, llm, window: int, n_seq: int) -> "Decoder":
        """A context of its own on the same model, for scoring: n_seq windows of `window` tokens, decoded in one
        micro-batch (the Llama object's context serves the chat turns)."""
        import llama_cpp

        params = llama_cpp.llama_context_params.from_buffer_copy(llm.context_params)
        params.n_ctx = params.n_batch = params.n_ubatch = n_seq * window
        params.n_seq_max = n_seq
        raw = llama_cpp.llama_init_from_model(llm.model, params)
        if not raw:
            raise RuntimeError(f"llama.cpp could not make a context for {n_seq} windows of {window} tokens")
        return cls(raw, llm.n_vocab(), n_seq * window, own=True)

    def reset(self) -> None:
        self._c.llama_memory_clear(self.memory, True)
        self.n_past = 0

    def decode_windows(self, windows: list[np.ndarray], first_output: int) -> list[np.ndarray]:
        """Each window its own sequence from position 0, all in one decode; each window's logits of its
        positions first_output.. (views, valid until the next call), as llama-perplexity's perplexity()."""
        self.reset()
        b, i = self.batch, 0
        for seq, window in enumerate(windows):
            for pos, t in enumerate(window):
                b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = int(t), pos, 1, pos >= first_output
                b.seq_id[i][0] = seq
                i += 1
        b.n_tokens = i
        if self._c.llama_decode(self.ctx, b) != 0:
            raise RuntimeError(f"llama_decode failed for {len(windows)} windows")
        rows = len(windows[0]) - first_output
        out = np.ctypeslib.as_array(self._c.llama_get_logits(self.ctx), shape=(len(windows) * rows, self.n_vocab))
        return [out[k * rows:(k + 1) * rows] for k in range(len(windows))]

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
        if self.own:
            self._c.llama_free(self.ctx)


class WindowGroups:
    """The loop's prepare and forward: the windows it will score are decoded `n_seq` at a time, and handed out
    one by one in its order."""

    def __init__(self, dec: Decoder, n_seq: int, first: int, last: int) -> None:
        self.dec, self.n_seq, self.first, self.last = dec, n_seq, first, last
        self.pending: deque = deque()
        self.ready: deque = deque()

    def prepare(self, windows: list[np.ndarray]) -> None:
        self.pending = deque(windows)

    def forward(self, window: np.ndarray) -> np.ndarray:
        if not self.ready:
            group = [self.pending.popleft() for _ in range(min(self.n_seq, len(self.pending)))]
            self.ready = deque(zip(group, self.dec.decode_windows(group, self.first)))
        decoded, logits = self.ready.popleft()
        assert np.array_equal(decoded, window), "windows asked for out of the prepared order"
        return logits[: self.last - self.first]


class LlamaRuntime:
    """protocol.Runtime: a GGUF as llama.cpp runs it. Scoring has a context of its own (windows_per_decode
    sequences); the chat turns run on the Llama object's, after the scoring's is freed."""

    name = "llama.cpp"
    no_template = "the GGUF has no tokenizer.chat_template"

    def __init__(self, model: str, spec: EvalSpec) -> None:
        import llama_cpp

        first, last = scored_range(spec.window)
        self.llm = llm = _load(model, spec.window, spec.threads)
        self.vocab_size = llm.n_vocab()
        n_seq = int(spec.windows_per_decode or WINDOWS_PER_DECODE)
        self.scoring = Decoder.for_windows(llm, spec.window, n_seq)
        groups = WindowGroups(self.scoring, n_seq, first, last)
        self.prepare, self.forward = groups.prepare, groups.forward
        self.vocab = llama_cpp.llama_model_get_vocab(llm.model)
        self.template = llm.metadata.get("tokenizer.chat_template")
        self.render = self._render if self.template else None
        self.dec: Decoder | None = None

    def scored(self) -> None:
        self.scoring.close()  # its KV cache and buffers, before the chat turns
        self.dec = Decoder.of(self.llm)

    def _piece(self, t: int) -> str:
        return self.llm.detokenize([t], special=True).decode("utf-8", errors="replace")

    def _render(self, messages: list[dict]) -> str:
        return render_chat(self.template, messages, bos_token=self._piece(self.llm.token_bos()),
                           eos_token=self._piece(self.llm.token_eos()))

    def generate(self, turns: list[tuple[str, int, bool]]) -> list[tuple[str, str | None]]:
        return [self._generate(*turn) for turn in turns]

    def _generate(self, prompt: str, max_tokens: int, special: bool = True) -> tuple[str, str | None]:
        """Greedy, until an end-of-generation token (llama.cpp's own set) or the cap."""
        import llama_cpp

        llm, dec = self.llm, self.dec
        ids = llm.tokenize(prompt.encode(), add_bos=False, special=True)
        max_tokens = min(max_tokens, llm.n_ctx() - len(ids))
        if max_tokens <= 0:
            return f"<the prompt has {len(ids)} tokens, more than the {llm.n_ctx()} this check runs with>", None
        dec.reset()
        logits = dec.decode(ids, len(ids) - 1)
        out: list[int] = []
        for _ in range(max_tokens):
            tok = int(np.argmax(logits[-1]))
            if llama_cpp.llama_vocab_is_eog(self.vocab, tok):
                return llm.detokenize(out, special=special).decode("utf-8", errors="replace"), self._piece(tok)
            out.append(tok)
            logits = dec.decode([tok], 0)
        return llm.detokenize(out, special=special).decode("utf-8", errors="replace"), None

    def close(self) -> None:
        self.dec.close()


def evaluate(model: str, spec: EvalSpec) -> EvalOutput:
    return run(LlamaRuntime(model, spec), spec)


if __name__ == "__main__":
    sys.exit(runner_main(sys.argv[1:], {"evaluate": evaluate}))
