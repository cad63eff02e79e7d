"""Profiles: which backends and variants a build makes, and how artifacts are evaluated."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from . import DEFAULT_PROFILE
from .errors import ProfileError
from .evaluate.probes import CAPITAL_SCHEMA, WEATHER_TOOL, check_schema, check_tools
from .evaluate.stats import parse_precision
from .gates import Bound, parse_bounds
from .paths import REPO_ROOT



REFERENCE_MODES = ("auto", "in-memory", "streamed")


@dataclass(frozen=True)
class EvalOptions:
    text: str = "builtin:botchan"
    ctx: int = 512
    max_tokens: int = 0  # 0 = all of the text
    precision: str = ""  # "KLD ±3% at 95%": stop scoring an artifact once its mean KLD is that precise
    enabled: bool = True  # false: no reference and no evaluation (files only), for a machine too small for them
    # How the reference runs: "in-memory" (weights memory-mapped, one window through every layer at a time),
    # "streamed" (layer by layer over all the windows, a layer in memory at a time: evaluate/streamed.py; it
    # scores and does not generate), or "auto": streamed when the in-memory run would not fit the machine.
    reference: str = "auto"


@dataclass(frozen=True)
class ChatChecks:
    """Tool-call and JSON-mode probes (evaluate/probes.py), run on the source and every artifact."""

    enabled: bool = True
    tool_question: str = "What is the weather in Paris right now? Use celsius."
    tools: list = field(default_factory=lambda: [WEATHER_TOOL])
    json_question: str = "Name the country France and its capital, as JSON."
    json_schema: dict = field(default_factory=lambda: dict(CAPITAL_SCHEMA))
    max_tokens: int = 96


@dataclass(frozen=True)
class SmokeOptions:
    system: str = "You are a helpful assistant."
    question: str = "What is the capital of France?"
    expect: str = "Paris"
    max_tokens: int = 48
    allow_failures: bool = False


@dataclass(frozen=True)
class PublishOptions:
    owner: str = ""  # user or organisation; empty: the token's user
    repo: str = "{owner}/{model}-{format}"  # one repo per format: GGUF, GPTQ, AWQ, exl2
    private: bool = False
    quantized_by: str = ""  # for the card's metadata; empty: the owner
    auto: bool = False  # publish after every successful build (as `build --publish`): what unattended jobs want


@dataclass(frozen=True)
class Profile:
    name: str
    description: str = ""
    backends: dict[str, dict[str, Any]] = field(default_factory=dict)
    evaluation: EvalOptions = EvalOptions()
    smoke: SmokeOptions = SmokeOptions()
    chat_checks: ChatChecks = ChatChecks()
    bounds: tuple[Bound, ...] = ()
    publish: PublishOptions = PublishOptions()
    source_file: str = ""


def profile_dirs() -> list[Path]:
    """Where profile names are looked up: ./profiles, then the built-in ones (inside an installed wheel, or the
    checkout's profiles/ folder)."""
    return [Path.cwd() / "profiles", Path(__file__).resolve().parent / "builtin_profiles", REPO_ROOT / "profiles"]


def available_profiles() -> list[str]:
    names = {p.stem for d in profile_dirs() if d.is_dir() for p in d.glob("*.yaml")}
    return sorted(names)


def load_profile(name_or_path: str | None) -> Profile:
    name_or_path = name_or_path or DEFAULT_PROFILE
    path = Path(name_or_path)
    if not path.is_file():
        path = next((d / f"{name_or_path}.yaml" for d in profile_dirs() if (d / f"{name_or_path}.yaml").is_file()), None)
        if path is None:
            raise ProfileError(
                f"unknown profile {name_or_path!r}",
                f"use one of: {', '.join(available_profiles()) or '(none found)'}, or a path to a YAML file",
            )
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ProfileError(f"{path} is not valid YAML: {str(e).splitlines()[0]}", "fix the file") from e
    return parse_profile(data, source=str(path))


def parse_profile(data: dict, source: str = "<dict>") -> Profile:
    if not isinstance(data, dict):
        raise ProfileError(f"{source}: a profile is a mapping", f"see profiles/{DEFAULT_PROFILE}.yaml")
    keys = ("name", "description", "backends", "evaluation", "smoke", "chat_checks", "bounds", "publish")
    unknown = set(data) - set(keys)
    if unknown:
        raise ProfileError(f"{source}: unknown profile key(s) {sorted(unknown)}", f"allowed: {', '.join(keys)}")
    backends = data.get("backends") or {}
    if not isinstance(backends, dict) or not backends:
        raise ProfileError(f"{source}: 'backends' must map backend names to options", "quantkit backends lists the formats; profiles/ has examples")
    evaluation = _options(EvalOptions, data.get("evaluation"), f"{source}: evaluation")
    parse_precision(evaluation.precision)
    if evaluation.reference not in REFERENCE_MODES:
        raise ProfileError(f"{source}: evaluation.reference must be one of {', '.join(REFERENCE_MODES)}, "
                           f"got {evaluation.reference!r}", "fix the profile")
    checks = _options(ChatChecks, data.get("chat_checks"), f"{source}: chat_checks")
    check_tools(checks.tools, f"{source}: chat_checks.tools")
    check_schema(checks.json_schema, f"{source}: chat_checks.json_schema")
    return Profile(
        name=str(data.get("name") or Path(source).stem),
        description=str(data.get("description") or ""),
        backends={k: dict(v or {}) for k, v in backends.items()},
        evaluation=evaluation,
        smoke=_options(SmokeOptions, data.get("smoke"), f"{source}: smoke"),
        chat_checks=checks,
        bounds=parse_bounds(data.get("bounds"), f"{source}: bounds"),
        publish=_options(PublishOptions, data.get("publish"), f"{source}: publish"),
        source_file=source,
    )


def _options(cls, data, where: str):
    data = data or {}
    fields = cls.__dataclass_fields__
    unknown = set(data) - set(fields)
    if unknown:
        raise ProfileError(f"{where}: unknown key(s) {sorted(unknown)}", f"allowed: {', '.join(fields)}")
    out = {}
    for key, value in data.items():
        want = type(getattr(cls(), key))
        if want is int and isinstance(value, bool) or not isinstance(value, want):
            raise ProfileError(f"{where}.{key} must be {want.__name__}, got {value!r}", "fix the profile")
        out[key] = value
    return cls(**out)
