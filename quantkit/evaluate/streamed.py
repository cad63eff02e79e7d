"""The reference run layer-major, for checkpoints whose weights do not fit in memory.

The in-memory reference (hf_runner) memory-maps every weight and runs one window through all the layers, then
the next: a model larger than free memory is then read from disk again for every window. This runs the
decoder the other way round, over every window of a round: it reads one layer's tensors from the
safetensors files, runs all the windows through it (each module widened to float32 as it runs, as the
in-memory reference does), and frees the layer. What stays in memory between layers is the windows' hidden
states (windows x window x hidden in float32) and the layers outside the decoder (embeddings, final norm, head).
Peak: the largest layer as stored, one module of it in float32, those, and one group of windows' activations;
flat in the number of layers.

The model's own modules do the work (transformers' classes, a MoE's experts one module each as in every
evaluation: evaluate/experts.py), so its numbers are the in-memory reference's. The inputs of the first
decoder layer (its attention mask, positions and rotary embeddings) are taken from the model's own forward,
stopped there, so nothing of an architecture's forward is written again here.

It scores and does not generate: each generated token needs every layer, so a reply would read the whole
model from disk once per token. The smoke test and the chat probes' source replies are then not the
reference's (docs/evaluation.md).
"""

from __future__ import annotations

import re
import sys
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import numpy as np

from .metrics import scored_range
from .protocol import EvalOutput, EvalSpec, run

NO_GENERATION = ("the reference ran layer by layer (streamed): it scores the text and does not generate, as every "
                 "generated token would read each layer from disk again; it has no smoke test or chat replies")
# Activation memory one group of windows may take in a layer; more windows than fit run in several groups.
GROUP_BYTES = 1_000_000_000
_LAYER = re.compile(r".*\.layers\.\d+")  # a decoder layer's module name (its parameters': this and a dot)


class NotStreamable(SystemExit):
    """A checkpoint this mode cannot run layer by layer; the message says why and what to do."""


def window_activation_bytes(config: dict, window: int) -> int:
    """float32 activations of one window in one decoder layer: the residual stream, attention's projections
    and scores, and the MLP's (a MoE's: each token's top-k experts)."""
    h = int(config.get("hidden_size") or 4096)
    heads = int(config.get("num_attention_heads") or 32)
    mlp = int(config.get("intermediate_size") or 4 * h) * int(config.get("num_experts_per_tok") or 1)
    return 4 * window * (8 * h + 3 * mlp + 2 * heads * window)


class StreamedModel:
    """A transformers model whose decoder layers are read from the checkpoint only while they run; a
    protocol.Runtime that scores and does not generate."""

    name = "transformers (streamed)"
    render = None  # no chat turns (above)

    def __init__(self, folder: str, spec: EvalSpec, device: str) -> None:
        import torch

        from .hf_runner import compute_in_float32
        from .placement import meta_model

        torch.set_num_threads(spec.threads)
        self.folder, self.device = Path(folder), device
        self.model, config = meta_model(folder, spec)
        text = config.get_text_config()
        if len(set(getattr(text, "layer_types", None) or [])) > 1:
            raise NotStreamable(f"error: {self.folder.name}'s layers use different attention masks "
                                f"({', '.join(sorted(set(text.layer_types)))}), which the streamed reference does not "
                                "take from the model's forward; use evaluation.reference: in-memory")
        self._materialize_buffers()
        self.places = self._placements()
        self.layers = self.model.get_decoder().layers
        # Each layer's parameters, in the layers' order (the decoder's module names end in their index).
        by_layer = defaultdict(list)
        for name in self.places:
            by_layer[m[0] if (m := _LAYER.match(name)) else ""].append(name)
        self.layer_params = [by_layer[name] for name, _ in self.model.named_modules() if _LAYER.fullmatch(name)]
        compute_in_float32(self.model)
        # Everything outside the decoder layers stays in memory (stored type) for the whole run.
        self._load(by_layer[""])
        for target, source in getattr(self.model, "all_tied_weights_keys", {}).items():
            if target not in self.places:
                _set_param(self.model, target, self.model.get_parameter(source))
        self.vocab_size = int(text.vocab_size)
        # spec.stream_group: windows per group, to run several groups of a small text (the tests).
        self.group = spec.stream_group or max(1, GROUP_BYTES // window_activation_bytes(text.to_dict(), spec.window))
        self.hidden: list = []
        first, last = scored_range(spec.window)
        self.keep = torch.arange(first, last, device=device)

    def _materialize_buffers(self) -> None:
        """Buffers computed at construction (rotary frequencies) are meta tensors on the meta device: make them
        on the real device and compute them with transformers' own initialisation."""
        for module in self.model.modules():
            if any(b is not None and b.is_meta for b in module.buffers(recurse=False)):
                module.to_empty(device=self.device, recurse=False)
                self.model._init_weights(module)

    def _placements(self) -> dict[str, tuple[Path, str]]:
        """{model parameter: (file, checkpoint name)} (evaluate/placement.py). Refused when transformers would
        convert tensors on load (fused, split or permuted: not one tensor per parameter), or would leave any
        unread."""
        from .hf_runner import refuse_unread
        from .placement import place

        placement = place(self.model, self.folder)
        if placement.converted:
            raise NotStreamable(f"error: transformers converts {len(placement.converted)} tensor(s) of {self.folder.name} "
                                f"when it loads them ({placement.converted[0]}, ...), which the streamed reference cannot "
                                "do layer by layer; use evaluation.reference: in-memory")
        refuse_unread(str(self.folder), placement.unread)
        return placement.places

    def _load(self, names: list[str]) -> None:
        """Read these parameters from the checkpoint, a file at a time, and put them in the model."""
        from safetensors import safe_open

        by_file = defaultdict(list)
        for name in names:
            by_file[self.places[name][0]].append(name)
        for file, in_file in by_file.items():
            with safe_open(file, framework="pt", device="cpu") as st:
                for name in in_file:
                    _set_param(self.model, name, st.get_tensor(self.places[name][1]).to(self.device))

    def _free(self, names: list[str]) -> None:
        for name in names:
            _set_param(self.model, name, self.model.get_parameter(name).to("meta"))

    def prepare(self, windows: list[np.ndarray]) -> None:
        """The final hidden states of these windows (then `forward` gives each one's logits), layer by layer."""
        import torch

        ids = torch.from_numpy(np.stack(windows).astype(np.int64)).to(self.device)
        groups = [ids[i:i + self.group] for i in range(0, len(ids), self.group)]
        with torch.inference_mode():
            inputs = [self._first_layer_inputs(g) for g in groups]
            for k, (layer, names) in enumerate(zip(self.layers, self.layer_params, strict=True)):
                self._load(names)
                for state, kwargs in inputs:
                    out = layer(state[0], **kwargs)
                    state[0] = out[0] if isinstance(out, tuple) else out
                self._free(names)
                print(f"progress {k + 1}/{len(self.layers)}", file=sys.stderr, flush=True)  # layers, then windows
            norm = self.model.get_decoder().norm
            self.hidden = [h for state, _ in inputs for h in norm(state[0])]
        self.next = 0

    def _first_layer_inputs(self, ids):
        """([hidden states], keyword arguments) the model's forward gives its first decoder layer for `ids`: the
        forward is stopped there, before any layer's weights are needed."""
        import torch

        seen = {}

        def stop(_module, args, kwargs):
            seen["hidden"], seen["kwargs"] = (args[0] if args else kwargs.pop("hidden_states")), kwargs
            raise _Stop

        hook = self.layers[0].register_forward_pre_hook(stop, with_kwargs=True)
        try:
            self.model.get_decoder()(input_ids=ids, use_cache=False)
        except _Stop:
            pass
        finally:
            hook.remove()
        return [seen["hidden"].to(torch.float32)], seen["kwargs"]

    def forward(self, window: np.ndarray) -> np.ndarray:
        """The next window's logits of the scored rows, in `prepare`'s order."""
        import torch

        with torch.inference_mode():
            out = self.model.get_output_embeddings()(self.hidden[self.next][self.keep])
        self.hidden[self.next] = None  # scored: its hidden states are not needed again
        self.next += 1
        return out.float().cpu().numpy()

    def generate(self, turns: list) -> list:
        raise NotImplementedError(NO_GENERATION)

    def facts(self, out: dict) -> dict:
        not_run = {"passed": False, "reply": "", "reason": "not run: the streamed reference does not generate", "prompt": ""}
        return {"note": NO_GENERATION, "streamed": True, "smoke": not_run}


class _Stop(Exception):
    pass


def _set_param(model, name: str, tensor) -> None:
    import torch

    owner, _, leaf = name.rpartition(".")
    module = model.get_submodule(owner)
    module._parameters[leaf] = tensor if isinstance(tensor, torch.nn.Parameter) else torch.nn.Parameter(
        tensor, requires_grad=False)


def evaluate_streamed(folder: str, spec: EvalSpec, device: str) -> EvalOutput:
    """The reference run layer-major through the shared loop; no chat turns (see above)."""
    return run(StreamedModel(folder, spec, device), replace(spec, chat=False))
