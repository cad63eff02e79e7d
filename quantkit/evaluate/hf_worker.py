"""Child process: evaluate a Hugging Face checkpoint folder with transformers (the fp16 source as the
reference of every format, and quantized folders that transformers loads; a format whose folders need more
than that wraps `evaluate` with a loader of its own).

  tokenize:  python -m quantkit.evaluate.hf_worker tokenize FOLDER TEXT_FILE OUT.npy BOS.json
  evaluate:  python -m quantkit.evaluate.hf_worker evaluate FOLDER SPEC.json OUT.json

SPEC is the same for every runner (evaluate/metrics.py). `reference: true` keeps the weights as stored (fp16 or bf16, 2 bytes
a parameter) and computes in float32: each module's weights are widened just before it runs and dropped
after, so the results are those of a float32 copy of the model (docs/evaluation.md) at half its memory.
`weights: "float32"` loads a whole float32 copy instead (4 bytes a parameter): the old reference, which
the tests compare with. `streamed: true` runs the reference layer by layer over all the windows, reading each
layer from the files while it runs (evaluate/streamed.py), for weights that do not fit in memory. With CUDA, the model runs on the GPU.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from .chat import chat_turns
from .experts import defuse
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


def compute_in_float32(model) -> None:
    """Run every module in float32 while its weights stay in their stored 16-bit type: a pre-hook widens
    the module's own parameters, a hook puts the 16-bit tensors back. One module's float32 copy exists
    at a time (the largest: the output head, or a MoE layer's fused experts), not the model's."""
    import torch

    def widen(module, *_):
        module._stored = {}
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
        compute_in_float32(model)
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


def evaluate(folder: str, spec: dict, load=load_model) -> dict:
    """Score `folder` as metrics.score does; `load(folder, spec)` gives (model, device, note)."""
    import torch
    from transformers import AutoTokenizer

    torch.set_num_threads(spec["threads"])
    if spec.get("reference") and spec.get("streamed"):
        from .streamed import evaluate_streamed

        return evaluate_streamed(folder, spec, "cuda" if torch.cuda.is_available() else "cpu")
    model, device, note = load(folder, spec)
    tok = AutoTokenizer.from_pretrained(folder)
    first, last = scored_range(spec["ctx"])
    keep = torch.arange(first, last, device=device)

    def forward(window: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            ids = torch.from_numpy(window.astype(np.int64))[None].to(device)
            # Only the scored rows go through the output head (vocabulary-sized), as llama-perplexity does.
            logits = model(ids, logits_to_keep=keep).logits[0]
        return logits.float().cpu().numpy()

    result = score(forward, spec, model.config.vocab_size)
    result |= chat_turns(*chat_functions(model, tok), spec, "the checkpoint has no chat template")
    if device == "cuda":
        result["peak_gpu_bytes"] = int(torch.cuda.max_memory_allocated())
    if note:
        result["note"] = note
    return result


def chat_functions(model, tok):
    """(generate, render) for chat_turns: transformers' generate and apply_chat_template, as users run them."""
    import torch

    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos]) | ({tok.eos_token_id} if tok.eos_token_id is not None else set())
    eos.discard(None)

    def generate(prompt: str, max_tokens: int, special: bool = True) -> tuple[str, str | None]:
        ids = tok(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"].to(model.device)
        with torch.inference_mode():
            out = model.generate(ids, max_new_tokens=max_tokens, do_sample=False, eos_token_id=sorted(eos),
                                 pad_token_id=tok.pad_token_id or sorted(eos)[0])
        new = out[0][ids.shape[1]:].tolist()
        end_token = tok.convert_ids_to_tokens(new[-1]) if new and new[-1] in eos else None
        return tok.decode(new[:-1] if end_token else new, skip_special_tokens=not special), end_token

    return generate, template_render(tok)


def template_render(tok):
    """The folder's chat template through transformers' apply_chat_template (None: it has none)."""
    if not tok.chat_template:
        return None
    return lambda messages: tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:], {"evaluate": evaluate, "tokenize": tokenize}))
