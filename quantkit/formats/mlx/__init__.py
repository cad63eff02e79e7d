"""MLX: mlx-lm's own converter (`mlx_lm.convert`), one folder per variant as mlx-community publishes them:
uniform 4- or 8-bit with a group size, or one of mlx-lm's mixed recipes. Sizes are planned by applying
mlx-lm's quantization to the lazily loaded model (exact, nothing computed). Evaluated on the exact weights
(runner: MLX dequantizes a layer at a time, transformers scores, mlx-lm runs the smoke test and a
runtime check on the folder as published), and
published as one repo per variant ({Model}-MLX-4bit), the folder on main."""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...errors import ProfileError, SourceError
from ...config_view import source_view
from ...fsutil import atomic_dir, drop_local_paths
from ...memory import scored_logits
from ...evaluate.parity import MAX_KLD, MIN_TOP1
from ...plan import ArtifactPlan
from ...results import Description, Judged
from ...procs import run_python
from ...source import Source, param_count, safetensors_header, tensor_stats
from ..base import BuildContext, Card, Evaluation, Format, Requirement, package, versions, weight_facts

INSTALL_HINT = "install the mlx extra: ./scripts/setup.sh installs it by default (or pip install 'quantkit[mlx]')"
BITS = (2, 3, 4, 5, 6, 8)  # mlx's affine quantization
GROUP_SIZES = (32, 64, 128)
DEFAULT_GROUP = 64  # mlx-lm's default; mlx-community's "-4bit" repos use it
_BPW = re.compile(r"Quantized model with ([\d.]+) bits per weight")
# mlx-lm's converter: mlx, transformers (its tokenizer) and the model, loaded lazily. mlx-lm's save_model
# splits the quantized weights into shards of at most 5 GiB (make_shards) and, with donate_model, drops the
# model's own references, so each shard is computed when it is written and freed after: what is in memory
# at once is the 16-bit source tensors one output shard is made from, read into MLX's own (anonymous) buffers.
# Measured: the sample (135M) 0.93 GB at 4-bit, 1.0 GB at 8-bit; the Mixtral-dimension synthetic with 2 layers
# (2.95B, one 1.9 GB shard) 5.99 GB anonymous and 0.27 GB file-backed, predicted 6.6 GB by convert_peak.
CONVERT_FIXED = 700_000_000
MLX_SHARD_BYTES = 5 << 30  # mlx_lm.utils.MAX_FILE_SIZE_GB
# Evaluating a folder (runner): mlx, mlx-lm, torch and transformers. Besides them, one after the other:
# MLX writing the dequantized 16-bit checkpoint a layer at a time; mlx-lm running the folder quantized (about
# its size); transformers scoring the checkpoint, memory-mapped (2 bytes a parameter: ArtifactPlan.runtime_bytes),
# one module widened to float32 at a time (the output head the largest).
MLX_EVAL_FIXED = 1_400_000_000
# mlx-lm's run of the folder with its scales and biases widened to float32: 4-bit with group 64 stores 4 bits
# and 2 x 16 bits per 64 weights, so the widening adds a quarter (an 8-bit folder's an eighth).
MLX_RUNTIME_FACTOR = 1.25


def variant_name(bits: int | None, group_size: int, recipe: str | None) -> str:
    name = recipe or f"{bits}bit"
    return name if group_size == DEFAULT_GROUP else f"{name}-g{group_size}"


def dequantize_peak(config: dict[str, Any]) -> int:
    """runner.write_checkpoint's anonymous memory: one decoder layer in 16 bits and its largest tensor
    (a MoE's experts of one projection, stacked) in float32, from the model's config."""
    h = int(config.get("hidden_size") or 0)
    mlp = int(config.get("intermediate_size") or 4 * h) * max(1, int(config.get("num_local_experts") or 0))
    heads = int(config.get("num_attention_heads") or 1)
    kv = int(config.get("num_key_value_heads") or heads) * int(config.get("head_dim") or h // heads)
    return 2 * (3 * mlp * h + 2 * h * h + 2 * h * kv) + 4 * mlp * h


def convert_peak(params: int, weight_bytes: int) -> int:
    """mlx-lm's converter on `params` 16-bit parameters writing `weight_bytes` of quantized weights: the source
    tensors of one output shard at a time (see CONVERT_FIXED)."""
    return CONVERT_FIXED + int(2 * params * min(1.0, MLX_SHARD_BYTES / max(weight_bytes, 1)))


@dataclass(frozen=True)
class Variant:
    bits: int | None = None  # uniform width; or
    recipe: str | None = None  # one of mlx-lm's mixed recipes (mixed_3_6: 3-bit, 6 bits where it matters most)
    group_size: int = DEFAULT_GROUP


@dataclass(frozen=True)
class Options:
    """The profile's `mlx:` mapping:

        mlx:
          variants: [{bits: 4}, {bits: 8, group_size: 64}, {recipe: mixed_3_6}]
    """

    variants: list[Variant] = field(default_factory=lambda: [Variant(bits=4)])


class MLXCard(Card):
    def made_by(self, tools: dict[str, str]) -> str:
        version = tools.get("mlx-lm")
        return "mlx-lm's converter" + (f" (mlx-lm {version})" if version else "")

    def notes(self, artifacts: list[Judged]) -> dict[str, list[str]]:
        models = [a for a in artifacts if a.role == "model"]
        if not models:
            return {}
        tied = any(a.details.get("tied_head") for a in models)
        text = ("mlx-lm quantizes every linear layer and the token embedding, not only the transformer blocks"
                + ("; this model ties its output head to the embedding, so the head is quantized with it. "
                   if tied else ". ")
                + "How they were measured: MLX's CPU backend is too slow on x86 to score text (6.5 s a token on the "
                  "sample's 4-bit folder), so MLX dequantizes each folder's layers with its own mx.dequantize (the exact "
                  "values its kernels compute with) and transformers scores those weights on the same token ids, against "
                  "the same fp16 reference as every other format, and writes the tool-call and JSON-mode replies. "
                  "mlx-lm itself runs the smoke test (mlx-lm's generate, on the folder as published, with float32 "
                  "activations), and must give the same next-token distributions as transformers on the same weights "
                  f"(KLD at most {MAX_KLD:g} and top-1 at least {MIN_TOP1:.0%} over 64 tokens, the parity bounds of "
                  "every runtime) or the build stops: that check catches a runtime that misreads the model's config.")
        return {"MLX": [text]}

    def usage(self, repo_id: str, local_dir: str, artifact: Judged) -> list[str]:
        return ["```python", "from mlx_lm import load, generate", "",
                f'model, tokenizer = load("{repo_id}")',
                'messages = [{"role": "user", "content": "What is the capital of France?"}]',
                "prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)",
                "print(generate(model, tokenizer, prompt=prompt, max_tokens=100))", "```", "",
                "or from the command line:", "", "```bash",
                f'mlx_lm.generate --model {repo_id} --prompt "What is the capital of France?"', "```"]


class MLXFormat(Format, name="mlx"):
    Options = Options
    evaluation = Evaluation("quantkit.formats.mlx.runner", fixed_bytes=MLX_EVAL_FIXED)
    card = MLXCard(display="MLX", layout="repos", tags=("mlx",), library_name="mlx", featured=("4bit",),
                   loads_in="They load in mlx-lm (`mlx_lm.load`) on Apple silicon, and on Linux with mlx's CPU or "
                          "CUDA build.")

    def requirements(self) -> list[Requirement]:
        return [package("mlx", "mlx", INSTALL_HINT), package("mlx-lm", "mlx_lm", INSTALL_HINT)]

    def step_peak(self, params: int) -> int:
        return convert_peak(params, params * 9 // 16)  # 4-bit with group 64: 4.5 bits a weight


    def vocabulary(self) -> set[str]:
        return super().vocabulary() | {"mlx_lm", "mlx-community"}

    def validate(self, options: Options) -> None:
        self._variants(options)

    def _variants(self, options: Options) -> list[dict[str, Any]]:
        out = []
        for i, v in enumerate(options.variants or [Variant(bits=4)]):
            where = f"mlx.variants[{i}]"
            if v.recipe is None and v.bits not in BITS:
                raise ProfileError(f"{where}: {v.bits!r}-bit is not a width MLX quantizes to",
                                   f"use bits in {list(BITS)}, or a mixed recipe (recipe: mixed_3_6)")
            if v.recipe is not None and v.bits is not None:
                raise ProfileError(f"{where}: {v.recipe} sets its own bits; bits {v.bits} would be ignored",
                                   "give either bits or recipe")
            if v.group_size not in GROUP_SIZES:
                raise ProfileError(f"{where}: group size {v.group_size!r} is not one MLX supports",
                                   f"use group_size in {list(GROUP_SIZES)}")
            out.append({"name": variant_name(v.bits, v.group_size, v.recipe), "bits": v.bits,
                        "group_size": v.group_size, "recipe": v.recipe})
        return out

    def plan(self, source: Source, options: Options, converter: str | None = None) -> list[ArtifactPlan]:
        variants = self._variants(options)
        sizes = _predict(source, variants)
        files = sum(p.stat().st_size for p in source.path.iterdir()
                    if p.is_file() and p.suffix != ".safetensors" and p.name != "model.safetensors.index.json")
        params = tensor_stats(source.path).params
        return [ArtifactPlan(
            backend=self.name, variant=v["name"], filename=f"{source.name}-MLX-{v['name']}",
            predicted_bytes=sizes[v["name"]]["weight_bytes"] + files, options=v,
            predicted_peak_bytes=convert_peak(params, sizes[v["name"]]["weight_bytes"]),
            runtime_bytes=2 * params,
            note="embedding quantized" + (" (the head is tied to it)" if not sizes[v["name"]]["separate_head"] else "")
            if sizes[v["name"]]["embedding_quantized"] else "") for v in variants]

    def build(self, item: ArtifactPlan, context: BuildContext) -> dict[str, Any]:
        out = context.out_dir / item.filename
        state = context.out_dir / ".quantkit"
        # mlx-lm reads rope_theta where transformers 4 wrote it, and copies the config it read into the folder.
        view = source_view(context.source.path, state / f"mlx-source-{item.variant}")
        with context.reporter.step(f"mlx {item.variant} (mlx-lm)") as step, atomic_dir(out) as tmp:
            spec_file = state / f"{item.filename}.spec.json"
            spec_file.write_text(json.dumps({**item.options, "source": str(view), "out": str(tmp)}))
            done = run_python(["-m", "quantkit.formats.mlx.tool", "convert", str(spec_file)],
                              what=f"mlx-lm converter ({item.variant})")
            spec_file.unlink()
            drop_local_paths(tmp / "config.json")
            (tmp / "README.md").unlink(missing_ok=True)  # mlx-lm's stub card: the published card replaces it
            step.update(1, 1)
        shutil.rmtree(view)
        bpw = next((float(m.group(1)) for line in done.lines if (m := _BPW.search(line))), 0.0)
        return {**done.memory(), "source_params": param_count(context.source.path), "mlx_bpw": bpw}

    def tools(self, item: ArtifactPlan, context: BuildContext) -> dict[str, str]:
        return versions("mlx", "mlx-lm")

    def describe(self, item: ArtifactPlan, path: Path, facts: dict[str, Any]) -> Description:
        config = json.loads((path / "config.json").read_text())
        q = config.get("quantization") or {}
        # Every quantized tensor has .scales beside it; its bits are the config's own entry for it, or the default.
        quantized = [k.removesuffix(".scales") for f in path.glob("*.safetensors") for k in safetensors_header(f)
                     if k.endswith(".scales")]
        types = Counter(f"{(q.get(k) if isinstance(q.get(k), dict) else q).get('bits')}-bit" for k in quantized)
        return Description(
            **weight_facts(path, facts), tensor_types=dict(sorted(types.items())),
            stated_bits=float(facts.get("mlx_bpw") or 0.0),
            details={"group_size": q.get("group_size"), "recipe": item.options.get("recipe"),
                     "tied_head": bool(config.get("tie_word_embeddings"))},
        )

    def evaluation_peak(self, artifact_bytes: int, vocab: int, window: int, config: dict[str, Any] | None,
                        item: ArtifactPlan | None = None) -> int:
        # Anonymous: the larger of MLX writing one layer and mlx-lm running the folder; then transformers' head
        # widened to float32. Memory-mapped: the dequantized checkpoint (artifact_bytes, 2 bytes a parameter).
        # The phases run one after the other; counting them together keeps the plan on the safe side.
        cfg = config or {}
        head = 4 * vocab * int(cfg.get("hidden_size") or 0)
        runtime = int(MLX_RUNTIME_FACTOR * (item.predicted_bytes if item else artifact_bytes // 4))
        return (self.evaluation.fixed_bytes + max(dequantize_peak(cfg), runtime) + head + artifact_bytes
                + scored_logits(vocab, window))

    def evaluation_mapped(self, item: ArtifactPlan) -> int:
        return item.runtime_bytes  # the dequantized checkpoint, as transformers maps it

    def evaluation_scratch(self, item: ArtifactPlan) -> int:
        return item.runtime_bytes  # that checkpoint, kept in the evaluation's scratch folder from its first round to its last


def _predict(source: Source, variants: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each variant's sizes, from mlx-lm in a child process (mlx-lm is never imported in the build process), which
    first checks that it knows the architecture and the recipes."""
    with tempfile.NamedTemporaryFile("w", suffix=".json") as f:
        json.dump({"source": str(source.path), "variants": variants}, f)
        f.flush()
        done = run_python(["-m", "quantkit.formats.mlx.tool", "sizes", f.name], what="mlx-lm size prediction")
    answer = json.loads(done.lines[-1])
    if answer.get("unsupported"):
        raise SourceError(f"mlx-lm cannot convert {source.name}: {answer['unsupported']}",
                          "leave mlx out of the profile for this model, or install an mlx-lm that supports its "
                          f"architecture ({source.config.get('model_type')})")
    if unknown := [v["recipe"] for v in variants if v["recipe"] and v["recipe"] not in answer["recipes"]]:
        raise ProfileError(f"mlx: mlx-lm has no recipe {unknown[0]!r}", f"use one of: {', '.join(answer['recipes'])}")
    return answer["sizes"]
