"""GPTQ and AWQ through GPTQModel (it writes the standard `quant_method: gptq` / `awq` checkpoints that
transformers, vLLM and exllama load). Each variant is a folder, evaluated by transformers as its users load it (runner) and published
as a branch of the format's repo."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ...errors import ProfileError
from ...evaluate.experts import is_moe
from ...evaluate.text import CALIBRATION, calibration_identity, calibration_text
from ...fsutil import atomic_dir, write_text_atomic
from ...plan import ArtifactPlan
from ...results import Description, Judged
from ...procs import run_python
from ...source import Source, param_count, safetensors_header, tensor_stats
from ..base import BuildContext, Card, Evaluation, Format, Requirement, package, versions, weight_facts

INSTALL_HINT = "install the gptq extra: QUANTKIT_EXTRAS=test,gptq ./scripts/setup.sh (or pip install 'quantkit[gptq]')"


@dataclass(frozen=True)
class Method:
    name: str  # gptq | awq
    suffix: str  # in folder names: {Model}-GPTQ-4bit-g32
    bits: tuple[int, ...]
    # Peak memory on CPU: torch and GPTQModel, plus the model as GPTQModel holds it (it offloads finished
    # layers to disk) and per-layer work buffers (Hessians, activations of the calibration samples).
    # Fitted to the tool's peak RSS at 38M (a MoE, 1.6 GB), 135M (the sample, 1.56 to 1.7 GB) and
    # 0.52B parameters (a MoE, 2.87 GB); not measured beyond that (GPTQ on 2 CPU cores takes hours at 7B).
    peak_fixed: int = 1_500_000_000
    peak_per_param: float = 2.7


@dataclass(frozen=True)
class Calibration:
    text: str = "builtin:botchan"  # never the evaluation text
    samples: int = 64
    seq_len: int = 512


@dataclass(frozen=True)
class Variant:
    bits: int = 4
    group_size: int = 128  # -1: one group per row
    desc_act: bool = False  # act-order
    sym: bool = True


@dataclass(frozen=True)
class Options:
    """The profile's `gptq:` (or `awq:`) mapping:

        gptq:
          variants: [{bits: 4, group_size: 32}, {bits: 4, group_size: 128, desc_act: true}]
          calibration: {text: builtin:botchan, samples: 64, seq_len: 512}
    """

    variants: list[Variant] = field(default_factory=lambda: [Variant()])
    calibration: Calibration = Calibration()


class GPTQCard(Card):
    def usage(self, repo_id: str, local_dir: str, artifact: Judged) -> list[str]:
        experts = artifact.details.get("experts")
        if not experts:
            return super().usage(repo_id, local_dir, artifact)
        # GPTQModel writes a MoE one module per expert; transformers 5 fuses experts on load and would leave these
        # unset (scored KLD 0.77 that way), so the card says how each runtime reads the folder as it is.
        revision = f', revision="{artifact.variant}"'
        return [
            "This is a mixture of experts, stored one module per expert as GPTQModel writes it. vLLM and GPTQModel "
            "read it as it is. transformers 5 fuses a MoE's experts when it loads them and would leave these weights "
            "unset: patch it with `defuser` (`pip install defuser`) before loading, as below.", "",
            "```python", "from defuser import replace_fused_blocks", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
            f'replace_fused_blocks("{experts["model_type"]}")  # keep the experts one module each, as stored',
            f'model = AutoModelForCausalLM.from_pretrained("{repo_id}"{revision})',
            f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}"{revision})', "```", "",
            "```bash", f"vllm serve {repo_id} --revision {artifact.variant}", "```", "",
            "```python", "from gptqmodel import GPTQModel", "", f'model = GPTQModel.load("{local_dir}")', "```"]


class GPTQModelFormat(Format):
    """Shared by the gptq and awq formats: plan-time checks, the tool process, the folder's facts."""

    method = Method("gptq", "GPTQ", (2, 3, 4, 8))
    Options = Options
    evaluation = Evaluation("quantkit.formats.gptq.runner")
    card = GPTQCard(display="GPTQ", made_with="GPTQModel", featured=("4bit-g32", "4bit-g128"),
                    loads_in="They load in transformers (with optimum and GPTQModel installed), vLLM and exllama.")

    def requirements(self) -> list[Requirement]:
        return [package("gptqmodel", "gptqmodel", INSTALL_HINT), package("optimum", "optimum", INSTALL_HINT)]

    def step_peak(self, params: int) -> int:
        return int(self.method.peak_fixed + self.method.peak_per_param * params)

    def vocabulary(self) -> set[str]:
        return super().vocabulary() | {"GPTQModel"}

    def validate(self, options: Options) -> None:
        check_calibration_name(self.name, options.calibration)
        for i, v in enumerate(options.variants):
            if v.bits not in self.method.bits:
                raise ProfileError(f"{self.name}.variants[{i}]: {v.bits}-bit is not supported",
                                   f"use bits in {list(self.method.bits)}")

    def plan(self, source: Source, options: Options, converter: str | None = None) -> list[ArtifactPlan]:
        where = f"{self.name}"
        calib = asdict(options.calibration)
        widths = _linear_widths(source)
        stats = tensor_stats(source.path)
        params, linear = stats.params, stats.linear
        widths_max = max(widths)
        files = sum(p.stat().st_size for p in source.path.iterdir() if p.is_file() and p.suffix != ".safetensors")
        items = []
        for v in map(asdict, options.variants or [Variant()]):
            g = v["group_size"]
            bad = sorted({w for w in widths if g != -1 and w % g})
            if bad:
                ok = [c for c in (32, 64, 128) if all(w % c == 0 for w in widths)]
                raise ProfileError(
                    f"{where}: group size {g} does not divide the layer widths {bad} of {source.name}",
                    f"use a group size that divides all of {sorted(widths)}: {ok + [-1]} (-1: one group per row)")
            variant = f"{v['bits']}bit-g{g if g != -1 else 'row'}" + ("-actorder" if v["desc_act"] else "")
            # Decoder-block linear layers at `bits` plus per-group fp16 scale and packed zero point; the
            # rest (embeddings, norms, an untied head) stays fp16.
            per_group = 16 + v["bits"]
            predicted = int(linear * (v["bits"] + per_group / (g if g > 0 else widths_max)) / 8 + (params - linear) * 2
                            + files)  # config, tokenizer and chat template, copied into the folder
            items.append(ArtifactPlan(
                backend=self.name, variant=variant, filename=f"{source.name}-{self.method.suffix}-{variant}",
                predicted_bytes=predicted, options={**v, "calibration": calib},
                predicted_peak_bytes=self.step_peak(params),
            ))
        return items

    def build(self, item: ArtifactPlan, context: BuildContext) -> dict[str, Any]:
        out = context.out_dir / item.filename
        spec = {"method": self.method.name, "source": str(context.source.path), **item.options, "threads": context.threads}
        text_file = context.out_dir / ".quantkit" / f"{item.filename}.calibration.txt"
        write_text_atomic(text_file, calibration_text(item.options["calibration"]["text"], context.evaluation_text))
        spec["calibration"] = {**spec["calibration"], "file": str(text_file)}
        with context.reporter.step(f"quantize {item.filename} ({self.method.name}, on CPU this takes minutes)") as step, \
                atomic_dir(out) as tmp:
            spec["out"] = str(tmp)
            spec_file = context.out_dir / ".quantkit" / f"{item.filename}.spec.json"
            spec_file.parent.mkdir(parents=True, exist_ok=True)
            spec_file.write_text(json.dumps(spec))

            def on_line(line: str) -> None:
                if line.startswith("progress "):
                    done, total = line.split()[1].split("/")
                    step.update(int(done), int(total))

            # cwd: GPTQModel writes a logs/ folder into the working directory; keep it with the build's state.
            done = run_python(["-m", "quantkit.formats.gptq.tool", str(spec_file)], on_line=on_line, cwd=spec_file.parent,
                              what=f"GPTQModel ({self.method.name})")
            spec_file.unlink()
        text_file.unlink()
        return {"source_params": param_count(context.source.path), **done.memory()}

    def tools(self, item: ArtifactPlan, context: BuildContext) -> dict[str, str]:
        return versions("gptqmodel", "transformers", "torch")  # GPTQModel quantizes with torch, through transformers

    def inputs(self, item: ArtifactPlan, context: BuildContext) -> dict[str, str]:
        return calibration_identity(item.options["calibration"]["text"], context.evaluation_text)

    def describe(self, item: ArtifactPlan, path: Path, facts: dict[str, Any]) -> Description:
        dtypes: Counter[str] = Counter()
        for f in path.glob("*.safetensors"):
            dtypes.update(t["dtype"] for k, t in safetensors_header(f).items() if k != "__metadata__")
        config = json.loads((path / "config.json").read_text())
        experts = {"model_type": config["model_type"]} if is_moe(config) else {}
        return Description(
            **weight_facts(path, facts), tensor_types=dict(sorted(dtypes.items())),
            stated_bits=float(item.options.get("bits") or 0),
            details={"experts": experts} if experts else {},
        )


class GPTQFormat(GPTQModelFormat, name="gptq"):
    pass


class AWQFormat(GPTQModelFormat, name="awq"):
    method = Method("awq", "AWQ", (4,))
    card = GPTQCard(display="AWQ", made_with="GPTQModel", featured=("4bit-g32", "4bit-g128"),
                    loads_in="They load in transformers (with GPTQModel installed) and vLLM.")


def check_calibration_name(where: str, calibration: Calibration) -> None:
    """A `builtin:` calibration text quantkit does not ship is refused at plan time (shared by the formats that
    calibrate on these options)."""
    text = calibration.text
    if text.startswith("builtin:") and text.split(":", 1)[1] not in CALIBRATION:
        raise ProfileError(f"{where}.calibration.text: unknown built-in calibration text {text!r}",
                           f"use one of: {', '.join('builtin:' + n for n in CALIBRATION)}, or a text file")


def _linear_widths(source: Source) -> set[int]:
    """Input widths of the quantized linear layers: hidden size and MLP width (group sizes must divide them)."""
    cfg = source.config
    widths = {cfg.get("hidden_size"), cfg.get("intermediate_size")}
    return {int(w) for w in widths if w}

