"""Child process: evaluate a Hugging Face checkpoint folder with transformers (the fp16 source as the
reference of every format, and quantized folders that transformers loads; a format whose folders need more
than that wraps `evaluate` with a loader of its own).

  tokenize:  python -m quantkit.evaluate.hf_runner tokenize FOLDER TEXT_FILE OUT.npy BOS.json
  evaluate:  python -m quantkit.evaluate.hf_runner evaluate FOLDER SPEC.json OUT.json

SPEC is the same for every runner (evaluate/protocol.py: EvalSpec). `reference: true` keeps the weights as stored (fp16 or bf16, 2 bytes
a parameter) and computes in float32: each module's weights are widened just before it runs and dropped
after, so the results are those of a float32 copy of the model (docs/evaluation.md) at half its memory.
Its chat replies read each prompt in float32 the same way, then decode the replies together as one batch in the
stored 16-bit dtype (`generate_batch`): widening the whole model again for every generated token cost 5 s a token
at 3B. `generate: "float32"` decodes every token in float32 instead, one prompt at a time (the old replies).
`weights: "float32"` loads a whole float32 copy instead (4 bytes a parameter): the old reference, which
the tests compare with. `streamed: true` runs the reference layer by layer over all the windows, reading each
layer from the files while it runs (evaluate/streamed.py), for weights that do not fit in memory. With CUDA, the model runs on the GPU.
"""

from __future__ import annotations

import inspect
import json
import sys
import time
from pathlib import Path

import numpy as np

from .experts import defuse
from .metrics import scored_range
from .protocol import EvalOutput, EvalSpec, run, runner_main


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


class Widening:
    """The switch of compute_in_float32's hooks: on, every module runs in float32; off, in its stored dtype."""

    def __init__(self) -> None:
        self.enabled = True


def compute_in_float32(model) -> Widening:
    """Run every module in float32 while its weights stay in their stored 16-bit type: a pre-hook widens
    the module's own parameters, a hook puts the 16-bit tensors back. One module's float32 copy exists
    at a time (the largest: the output head, or a MoE layer's fused experts), not the model's. The switch
    it returns turns the widening off (the reference's batched decode) and on again."""
    import torch

    switch = Widening()

    def widen(module, *_):
        module._stored = {}
        if not switch.enabled:
            return
        for name, p in module.named_parameters(recurse=False):
            if p.is_floating_point() and p.dtype != torch.float32:
                module._stored[name], p.data = p.data, p.data.float()

    def narrow(module, *_):
        for name, p in module.named_parameters(recurse=False):
            if name in module._stored:
                p.data = module._stored[name]
        module._stored = {}

    for module in model.modules():
        if any(p.is_floating_point() and p.dtype != torch.float32 for p in module.parameters(recurse=False)):
            module.register_forward_pre_hook(widen)
            module.register_forward_hook(narrow)
    return switch


def load_model(folder: str, spec: dict):
    """(model, device, note): the checkpoint on this machine's best device, the reference as described
    above, other folders as transformers loads them; `note` says what the report must know of how. Refused
    when transformers leaves weights unset or finds weights it has no place for: scoring that model would
    measure random weights."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if not spec.get("reference"):
        return load_folder(folder, device, spec)
    dtype = torch.float32 if spec.get("weights") == "float32" else "auto"
    model, unread = load_with_transformers(folder, device, spec, dtype=dtype)
    refuse_unread(folder, unread)
    if dtype == "auto":
        model.quantkit_widening = compute_in_float32(model)
    return model, device, ""


def load_folder(folder: str, device: str, spec: dict | None = None):
    """A quantized folder through transformers, as its users load it."""
    model, unread = load_with_transformers(folder, device, spec)
    refuse_unread(folder, unread)
    return model, device, ""


def load_with_transformers(folder: str, device: str, spec: dict | None = None, **kwargs):
    """(model, the weights transformers did not read: unset, unplaced or of the wrong shape). A MoE's experts
    stay one module each, as stored (evaluate/experts.py), unless spec["experts"] is "fused"."""
    from transformers import AutoModelForCausalLM

    defuse(folder, spec)
    model, info = AutoModelForCausalLM.from_pretrained(folder, device_map=device, output_loading_info=True, **kwargs)
    unread = ([f"{k} (unset)" for k in sorted(info.get("missing_keys") or [])]
              + [f"{k} (in the files, not in the model)" for k in sorted(info.get("unexpected_keys") or [])]
              + [f"{m[0]} (another shape)" for m in info.get("mismatched_keys") or []])
    return model.eval(), unread


def refuse_unread(folder: str, unread: list[str]) -> None:
    if unread:
        raise SystemExit(f"error: transformers leaves {len(unread)} weight(s) of {Path(folder).name} unread, so scoring "
                         f"it would measure random weights: {', '.join(unread[:3])}")


def evaluate(folder: str, spec: EvalSpec, load=load_model) -> EvalOutput:
    """Score `folder` through the shared loop (protocol.run); `load(folder, spec)` gives (model, device, note)."""
    import torch

    spec = EvalSpec.of(spec)
    if spec.reference and spec.streamed:
        from .streamed import evaluate_streamed

        return evaluate_streamed(folder, spec, "cuda" if torch.cuda.is_available() else "cpu")
    return run(TransformersRuntime(folder, spec, load), spec)


class TransformersRuntime:
    """protocol.Runtime: a folder as transformers runs it, loaded by `load(folder, spec)` -> (model, device, note)."""

    name = "transformers"
    no_template = "the checkpoint has no chat template"

    def __init__(self, folder: str, spec: EvalSpec, load=load_model) -> None:
        import torch
        from transformers import AutoTokenizer

        torch.set_num_threads(spec.threads)
        self.model, self.device, self.note = load(folder, spec)
        self.tok = AutoTokenizer.from_pretrained(folder)
        self.vocab_size = self.model.config.vocab_size
        first, last = scored_range(spec.window)
        self.keep = torch.arange(first, last, device=self.device)
        self._generate, self.render, self._generate_many, self.chat_stats = chat_functions(self.model, self.tok, spec)
        self.chat_seconds = 0.0

    def forward(self, window: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            ids = torch.from_numpy(window.astype(np.int64))[None].to(self.device)
            # Only the scored rows go through the output head (vocabulary-sized), as llama-perplexity does.
            logits = self.model(ids, logits_to_keep=self.keep).logits[0]
        return logits.float().cpu().numpy()

    def generate(self, turns: list[tuple[str, int, bool]]) -> list[tuple[str, str | None]]:
        start = time.monotonic()
        try:
            if self._generate_many is not None:
                return self._generate_many(turns)
            return [self._generate(*turn) for turn in turns]
        finally:
            self.chat_seconds += time.monotonic() - start

    def facts(self, out: dict) -> dict:
        import torch

        facts = {}
        smoke = out.get("smoke")
        if smoke and smoke.get("end_token") is None and self.render and not stop_ids(self.model, self.tok):
            facts["smoke"] = smoke | {
                "reason": ("the checkpoint names no EOS token (eos_token_id in generation_config.json or config.json, "
                           "eos_token in tokenizer_config.json), so no turn can end")}
        if self.chat_stats["generated_tokens"]:
            facts["chat_stats"] = self.chat_stats | {"seconds": round(self.chat_seconds, 2)}
        if self.device == "cuda":
            facts["peak_gpu_bytes"] = int(torch.cuda.max_memory_allocated())
        if self.note:
            facts["note"] = self.note
        return facts


def chat_functions(model, tok, spec: dict | None = None):
    """(generate, render, generate_many, stats) for chat_turns: transformers' generate and apply_chat_template, as
    users run them. For the reference (compute_in_float32), generate_many reads each prompt in float32 and decodes
    the replies in the stored dtype, as one batch (generate_batch; spec["generate"] "stored", the default), or every
    token in float32 a prompt at a time (spec["generate"] "float32", the old replies, slow at scale). `stats`
    counts the prompt and generated tokens and the seconds each phase took, as the turns run."""
    import torch

    eos = stop_ids(model, tok)
    # Without any EOS every reply runs to its cap (evaluate says why the smoke test then fails). The pad id only
    # fills masked positions, so any token serves; `is not None`, because a pad id of 0 is a real one.
    eos_ids = sorted(eos) or None
    pad = tok.pad_token_id if tok.pad_token_id is not None else min(eos, default=0)
    stats = {"prompt_tokens": 0, "generated_tokens": 0, "prefill_seconds": 0.0, "decode_seconds": 0.0}

    def reply(new: list[int], special: bool) -> tuple[str, str | None]:
        end_token = tok.convert_ids_to_tokens(new[-1]) if new and new[-1] in eos else None
        return tok.decode(new[:-1] if end_token else new, skip_special_tokens=not special), end_token

    def generate(prompt: str, max_tokens: int, special: bool = True) -> tuple[str, str | None]:
        ids = tok(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"].to(model.device)
        start = time.monotonic()
        with torch.inference_mode():
            out = model.generate(ids, max_new_tokens=max_tokens, do_sample=False, eos_token_id=eos_ids, pad_token_id=pad)
        new = out[0][ids.shape[1]:].tolist()
        stats["prompt_tokens"] += ids.shape[1]
        stats["generated_tokens"] += len(new)
        stats["decode_seconds"] += time.monotonic() - start
        return reply(new, special)

    widening = getattr(model, "quantkit_widening", None)

    def generate_many(turns: list[tuple[str, int, bool]]) -> list[tuple[str, str | None]]:
        prompts = [tok(p, add_special_tokens=False)["input_ids"] for p, _, _ in turns]
        news = generate_batch(model, widening, prompts, [n for _, n, _ in turns], eos, pad, stats)
        return [reply(new, special) for new, (_, _, special) in zip(news, turns)]

    # Batched only for the reference (widened to float32) decoding in its stored dtype; a model run as loaded, or
    # spec["generate"] "float32", answers a turn at a time (None: chat_turns falls back to generate).
    batched = widening is not None and (spec or {}).get("generate", "stored") == "stored"
    return generate, template_render(tok), generate_many if batched else None, stats


def stop_ids(model, tok) -> set[int]:
    """The ids that end a reply: generation_config's EOS list and the tokenizer's EOS (either may be missing)."""
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos]) | {tok.eos_token_id}
    eos.discard(None)
    return eos


def generate_batch(model, widening: Widening, prompts: list[list[int]], max_tokens: list[int], eos: set[int],
                   pad: int, stats: dict) -> list[list[int]]:
    """Greedy replies (token ids, ending with the end-of-turn token when there is one) to several prompts. Each
    prompt is read on its own in float32 (as the windows are scored) and gives the first token; the KV caches, kept
    in the stored 16-bit dtype, are padded on the left into one batch, and transformers' generate decodes every
    reply at once in that dtype: one pass over the weights a step for all the replies, where widening to float32
    cost a conversion of the whole model per token. A cache transformers keeps in another form than plain
    per-layer tensors (linear attention, a sliding window already full) is decoded a prompt at a time instead."""
    import torch
    from transformers.cache_utils import DynamicSlidingWindowLayer

    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    device = model.device
    # transformers 5.2x names the cache `cache` (past_key_values, its old name, still works with a warning).
    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    greedy = {"do_sample": False, "eos_token_id": sorted(eos) or None, "pad_token_id": pad}
    first, caches = [], []
    start = time.monotonic()
    widening.enabled = True
    with torch.inference_mode():
        for ids in prompts:
            out = model.generate(torch.tensor([ids], device=device), max_new_tokens=1, return_dict_in_generate=True,
                                 **greedy)
            first.append(int(out.sequences[0, -1]))
            caches.append(getattr(out, cache_kw))
    stats["prompt_tokens"] += sum(len(ids) for ids in prompts)
    stats["prefill_seconds"] += time.monotonic() - start
    news = [[t][: max_tokens[i]] for i, t in enumerate(first)]
    live = [i for i, t in enumerate(first) if t not in eos and max_tokens[i] > 1]
    start = time.monotonic()
    widening.enabled = False
    try:
        if live and all(_paddable(caches[i]) for i in live):
            width = max(len(prompts[i]) for i in live)
            cache = caches[live[0]]
            for n, layer in enumerate(cache.layers):
                rows = [caches[i].layers[n] for i in live]
                layer.keys = torch.cat([_pad_left(r.keys, width) for r in rows]).to(dtype)
                layer.values = torch.cat([_pad_left(r.values, width) for r in rows]).to(dtype)
                if isinstance(layer, DynamicSlidingWindowLayer):
                    layer.cumulative_length = width
            ids = torch.full((len(live), width + 1), pad, dtype=torch.long, device=device)
            mask = torch.zeros_like(ids)
            for row, i in enumerate(live):
                ids[row, width - len(prompts[i]):] = torch.tensor(prompts[i] + [first[i]], device=device)
                mask[row, width - len(prompts[i]):] = 1
            with torch.inference_mode():
                out = model.generate(ids, attention_mask=mask, **{cache_kw: cache},
                                     max_new_tokens=max(max_tokens[i] for i in live) - 1, **greedy)
            tails = {i: out[row, width + 1:].tolist() for row, i in enumerate(live)}
        else:  # each reply from its prompt and first token, read again in the stored dtype
            tails = {}
            for i in live:
                with torch.inference_mode():
                    out = model.generate(torch.tensor([prompts[i] + [first[i]]], device=device),
                                         max_new_tokens=max_tokens[i] - 1, **greedy)
                tails[i] = out[0, len(prompts[i]) + 1:].tolist()
        for i, tail in tails.items():
            for t in tail[: max_tokens[i] - 1]:
                news[i].append(t)
                if t in eos:
                    break
    finally:
        widening.enabled = True
    stats["generated_tokens"] += sum(len(new) for new in news)
    stats["decode_seconds"] += time.monotonic() - start
    return news


def _paddable(cache) -> bool:
    """A cache of plain per-layer tensors (every position kept), which can be padded into a batch."""
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    return bool(getattr(cache, "layers", None)) and all(
        type(layer) is DynamicLayer
        or (type(layer) is DynamicSlidingWindowLayer and layer.cumulative_length == layer.keys.shape[-2])
        for layer in cache.layers)


def _pad_left(states, width: int):
    """[batch, heads, positions, dim] states, zeros on the left up to `width` positions (masked out)."""
    import torch

    return torch.nn.functional.pad(states, (0, 0, width - states.shape[-2], 0))


def template_render(tok):
    """The folder's chat template through transformers' apply_chat_template (None: it has none)."""
    if not tok.chat_template:
        return None
    return lambda messages: tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


if __name__ == "__main__":
    sys.exit(runner_main(sys.argv[1:], {"evaluate": evaluate, "tokenize": tokenize}))
