"""compressed-tensors: vLLM's own checkpoint format, made by llm-compressor (vllm-project) with its `oneshot` and
its presets: FP8_DYNAMIC (FP8 weights per channel, activations quantized as they come, no calibration), W4A16 (GPTQ
4-bit with the profile's group size), W8A8 (INT8 weights and activations, SmoothQuant then GPTQ) and NVFP4A16.

llm-compressor runs in an environment of its own (pyproject's [tool.quantkit.environments]: it pins a torch and a
transformers the main environment cannot take); the folder is scored here, loaded by transformers through the
compressed-tensors package, which decompresses it on the CPU (the loader users' tools share). Each scheme is a repo
of its own on the Hub, named as vLLM users look for them: {owner}/{Model}-FP8-Dynamic, -W4A16, -W8A8."""

from __future__ import annotations

import json
import os
import re
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from ...errors import ProfileError
from ...evaluate.text import CALIBRATION, calibration_identity, calibration_text, read_text
from ...fsutil import atomic_dir, write_text_atomic
from ...plan import ArtifactPlan
from ...procs import run_program
from ...results import Description, Judged
from ...source import Source, param_count, safetensors_header, tensor_stats
from ..base import BuildContext, Card, Evaluation, Format, Requirement, package, weight_facts
from ..gptq import Calibration, check_calibration_name

ENVIRONMENT = "llmcompressor"
PYTHON_ENV = "QUANTKIT_LLMCOMPRESSOR_PYTHON"
INSTALL_HINT = ("run ./scripts/setup.sh (its default extras include ctensors: it makes llm-compressor's environment), "
                f"or point {PYTHON_ENV} at the python of an environment with llmcompressor")
LOAD_HINT = "install the ctensors extra: pip install 'quantkit[ctensors]' (transformers loads the folders through it)"

# Scheme -> (the folder's and repo's suffix, bits of a quantized weight, bytes of scale per group of `group` weights
# (0: one scale per output channel), calibrated). Sizes: the quantized linear layers at that rate, the rest as stored.
SCHEMES = {
    "FP8_DYNAMIC": ("FP8-Dynamic", 8, 0, False),
    "W4A16": ("W4A16", 4, 2, True),  # a 16-bit scale per group (symmetric: no zero point)
    "W8A8": ("W8A8", 8, 0, True),
    "NVFP4A16": ("NVFP4A16", 4, 1, False),  # an FP8 scale per 16 weights, and a global scale per tensor
}
NVFP4_GROUP = 16
LAYER_LINE = re.compile(r"\((\d+)/(\d+)\): Calibrating")


@dataclass(frozen=True)
class Scheme:
    scheme: str = "FP8_DYNAMIC"
    group_size: int = 128  # W4A16's; the other schemes have their own


@dataclass(frozen=True)
class Options:
    """The profile's `compressed_tensors:` mapping:

        compressed_tensors:
          schemes: [{scheme: FP8_DYNAMIC}, {scheme: W4A16, group_size: 64}, {scheme: W8A8}]
          calibration: {text: builtin:botchan, samples: 64, seq_len: 512}   # W4A16 and W8A8 calibrate
          ignore: [lm_head]                                                 # modules left as they are
    """

    schemes: list[Scheme] = field(default_factory=lambda: [Scheme()])
    calibration: Calibration = Calibration()
    ignore: list[str] = field(default_factory=lambda: ["lm_head"])


def read_calibration_file(spec: str) -> str:
    """A built-in or file calibration text, as written (the overlap check with the evaluation text is the build's)."""
    if spec.startswith("builtin:"):
        return CALIBRATION[spec.split(":", 1)[1]].read_text(encoding="utf-8")
    return read_text(spec).content


def environment_python() -> Path:
    """The python of llm-compressor's environment: $QUANTKIT_LLMCOMPRESSOR_PYTHON, else the one setup.sh linked
    beside this environment (.venv/envs/llmcompressor)."""
    return Path(os.environ.get(PYTHON_ENV) or Path(sys.prefix) / "envs" / ENVIRONMENT / "bin" / "python")


def environment_versions() -> dict[str, str]:
    """llmcompressor's and its torch's and transformers' versions in that environment, read from its metadata (no
    import: importing llm-compressor takes seconds). Empty when there is no such environment."""
    python = environment_python()
    sites = sorted(python.parent.parent.glob("lib/python*/site-packages")) if python.exists() else []
    found = {}
    for dist in metadata.distributions(path=[str(s) for s in sites]):
        name = dist.metadata["Name"].lower()
        if name in ("llmcompressor", "compressed-tensors", "torch", "transformers"):
            found[name] = dist.version
    return found if "llmcompressor" in found else {}


class CompressedTensorsCard(Card):
    def label(self, variant: str) -> str:
        return f"{self.display} {variant}"  # "compressed-tensors W4A16": the format's name is not an acronym

    def usage(self, repo_id: str, local_dir: str, artifact: Judged) -> list[str]:
        return [
            "vLLM loads this folder as it is, with its own compressed-tensors kernels:", "",
            "```bash", f"vllm serve {repo_id}", "```", "",
            "```python", "from vllm import LLM, SamplingParams", "",
            f'llm = LLM(model="{repo_id}")',
            'print(llm.chat([{"role": "user", "content": "What is the capital of France?"}], '
            "SamplingParams(max_tokens=100))[0].outputs[0].text)", "```", "",
            "The scores above were measured through transformers, which decompresses the weights (with the "
            "`compressed-tensors` package), not through vLLM's kernels."]

    def notes(self, artifacts: list[Judged]) -> dict[str, list[str]]:
        recipes = [(a.variant, a.details["recipe"]) for a in artifacts if a.details.get("recipe")]
        if not recipes:
            return {}
        return {"llm-compressor recipe": [p for variant, text in recipes
                                          for p in (f"{variant}:", "```yaml\n" + text.rstrip() + "\n```")]}


class CompressedTensorsFormat(Format, name="compressed_tensors"):
    Options = Options
    evaluation = Evaluation("quantkit.formats.ctensors.runner")
    card = CompressedTensorsCard(
        display="compressed-tensors", made_with="llm-compressor", layout="repos", repo="{owner}/{model}-{variant}",
        tags=("compressed-tensors", "vllm"), library_name="transformers", featured=("FP8-Dynamic", "W4A16"),
        loads_in="They load in vLLM (`vllm serve`), and in transformers with the compressed-tensors package.")

    def requirements(self) -> list[Requirement]:
        tool = Requirement(f"package llmcompressor in {environment_python()}", bool(environment_versions()), INSTALL_HINT)
        return [tool, package("compressed-tensors", "compressed_tensors", LOAD_HINT)]

    def vocabulary(self) -> set[str]:
        return super().vocabulary() | {"llm-compressor", "vLLM", "vllm"}

    def step_peak(self, params: int) -> int:
        # llm-compressor holds the model as stored (16-bit) with torch and transformers, and per layer the GPTQ
        # Hessians and the calibration activations: the GPTQ format's measured fit, which bounds it.
        return int(1_500_000_000 + 2.7 * params)

    def validate(self, options: Options) -> None:
        check_calibration_name(self.name, options.calibration)
        for i, s in enumerate(options.schemes):
            if s.scheme not in SCHEMES:
                raise ProfileError(f"{self.name}.schemes[{i}]: llm-compressor has no scheme {s.scheme!r} that quantkit "
                                   "makes", f"use one of: {', '.join(SCHEMES)}")

    def plan(self, source: Source, options: Options, converter: str | None = None) -> list[ArtifactPlan]:
        cfg = source.config
        widths = sorted({int(w) for w in (cfg.get("hidden_size"), cfg.get("intermediate_size")) if w})
        stats = tensor_stats(source.path)
        files = sum(p.stat().st_size for p in source.path.iterdir() if p.is_file() and p.suffix != ".safetensors")
        rest_bytes = (stats.params - stats.linear) * 2  # embeddings, norms, an untied head: kept 16-bit
        if any(SCHEMES[s.scheme][3] for s in options.schemes):
            self._check_calibration_length(source, options.calibration)
        items = []
        for s in options.schemes:
            suffix, bits, scale_bytes, calibrated = SCHEMES[s.scheme]
            group = s.group_size if s.scheme == "W4A16" else NVFP4_GROUP if s.scheme == "NVFP4A16" else 0
            if group and (bad := [w for w in widths if w % group]):
                ok = [g for g in (32, 64, 128) if all(w % g == 0 for w in widths)]
                raise ProfileError(f"{self.name}: {s.scheme} with group size {group} does not divide the layer widths "
                                   f"{bad} of {source.name}", f"use a group size that divides all of {widths}: {ok}")
            variant = suffix if s.scheme != "W4A16" or group == 128 else f"{suffix}-g{group}"
            per_weight = bits / 8 + (scale_bytes / group if group else 0)
            channels = stats.linear // widths[0] if widths else 0  # one 16-bit scale per output channel
            predicted = int(stats.linear * per_weight + (0 if group else channels * 2) + rest_bytes + files)
            opts = {"scheme": s.scheme, "group_size": group, "ignore": list(options.ignore)}
            if calibrated:
                opts["calibration"] = asdict(options.calibration)
            items.append(ArtifactPlan(backend=self.name, variant=variant, filename=f"{source.name}-{variant}",
                                      predicted_bytes=predicted, options=opts,
                                      predicted_peak_bytes=self.step_peak(stats.params)))
        return items

    def _check_calibration_length(self, source: Source, calibration: Calibration) -> None:
        """A built-in or file calibration text too short for `samples` windows of `seq_len` tokens of this model's
        tokenizer is refused now, not after the model is loaded (a Hub dataset is read at build time, and checked
        there)."""
        if calibration.text.startswith("hf:"):
            return
        from transformers import AutoTokenizer

        text = read_calibration_file(calibration.text)
        tokens = len(AutoTokenizer.from_pretrained(source.path)(text, add_special_tokens=False)["input_ids"])
        windows = tokens // calibration.seq_len
        if windows < calibration.samples:
            raise ProfileError(
                f"{self.name}.calibration: {calibration.text} has {tokens} tokens, {windows} window(s) of "
                f"{calibration.seq_len}, fewer than the {calibration.samples} samples asked",
                f"lower calibration.samples to {windows} or seq_len, or give a longer text" if windows else
                "give a longer calibration text, or a shorter seq_len")

    def build(self, item: ArtifactPlan, context: BuildContext) -> dict[str, Any]:
        out = context.out_dir / item.filename
        spec = {"source": str(context.source.path), **item.options, "threads": context.threads}
        state = context.out_dir / ".quantkit"
        text_file = state / f"{item.filename}.calibration.txt"
        if "calibration" in item.options:
            write_text_atomic(text_file, calibration_text(item.options["calibration"]["text"], context.evaluation_text))
            spec["calibration"] = {**spec["calibration"], "file": str(text_file)}
        with context.reporter.step(f"quantize {item.filename} (llm-compressor {item.options['scheme']})") as step, \
                atomic_dir(out) as tmp:
            spec["out"] = str(tmp)
            spec_file = state / f"{item.filename}.spec.json"
            spec_file.parent.mkdir(parents=True, exist_ok=True)
            spec_file.write_text(json.dumps(spec))

            def on_line(line: str) -> None:
                # llm-compressor calibrates layer by layer, "(3/31): Calibrating: ...": that is the step's progress.
                if layer := LAYER_LINE.match(line):
                    step.update(int(layer[1]) - 1, int(layer[2]))

            done = run_program(environment_python(), [str(Path(__file__).with_name("tool.py")), str(spec_file)],
                               on_line=on_line, cwd=state, what=f"llm-compressor ({item.options['scheme']})")
            spec_file.unlink()
        text_file.unlink(missing_ok=True)
        return {"source_params": param_count(context.source.path), **done.memory()}

    def tools(self, item: ArtifactPlan, context: BuildContext) -> dict[str, str]:
        return environment_versions()  # llm-compressor and what it quantized with, in its own environment

    def inputs(self, item: ArtifactPlan, context: BuildContext) -> dict[str, str]:
        if "calibration" not in item.options:
            return {}
        return calibration_identity(item.options["calibration"]["text"], context.evaluation_text)

    def describe(self, item: ArtifactPlan, path: Path, facts: dict[str, Any]) -> Description:
        dtypes: Counter[str] = Counter()
        for f in path.glob("*.safetensors"):
            dtypes.update(t["dtype"] for k, t in safetensors_header(f).items() if k != "__metadata__")
        recipe = path / "recipe.yaml"
        _, bits, _, _ = SCHEMES[item.options["scheme"]]
        return Description(**weight_facts(path, facts), tensor_types=dict(sorted(dtypes.items())),
                           stated_bits=float(bits),
                           details={"recipe": recipe.read_text()} if recipe.exists() else {})
