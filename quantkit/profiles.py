"""Profiles: which formats and variants a build makes, and how artifacts are evaluated."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from . import DEFAULT_PROFILE
from .errors import ProfileError
from .evaluate.chat import CHAT_CTX
from .evaluate.probes import CAPITAL_SCHEMA, WEATHER_TOOL, check_schema, check_tools
from .evaluate.stats import parse_precision
from .gates import Bound, parse_bounds
from .options import load_options
from .paths import REPO_ROOT



REFERENCE_MODES = ("auto", "in-memory", "streamed")


@dataclass(frozen=True)
class EvalOptions:
    text: str = "builtin:botchan"
    window: int = 512  # tokens a scored window (llama-perplexity's -c); `ctx:` is its old name, still read
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
    # Each artifact's template and tool-call parsing checked in its runtime's own engine (GGUF: llama-server),
    # whether or not the probes above run (`enabled`).
    engine: bool = True


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
    formats: dict[str, dict[str, Any]] = field(default_factory=dict)  # format name -> its options, as written
    evaluation: EvalOptions = EvalOptions()
    smoke: SmokeOptions = SmokeOptions()
    chat_checks: ChatChecks = ChatChecks()
    bounds: tuple[Bound, ...] = ()
    publish: PublishOptions = PublishOptions()
    source_file: str = ""
    deprecated: tuple[str, ...] = ()  # what the file says in an old way, for the plan to warn of

    def __post_init__(self) -> None:
        check_numbers(self)


# Windows shorter than this score a handful of positions each (the second half of a window is scored); longer than
# this, one window's logits alone outgrow any machine's memory.
MIN_WINDOW, MAX_WINDOW = 16, 1 << 20


def check_numbers(profile: Profile) -> None:
    """The evaluation's counts, at profile load rather than as a division by zero or a runtime's error mid-build."""
    where = f"{profile.source_file}: " if profile.source_file else ""
    ev = profile.evaluation
    if not MIN_WINDOW <= ev.window <= MAX_WINDOW:
        raise ProfileError(f"{where}evaluation.window must be between {MIN_WINDOW} and {MAX_WINDOW} tokens, got "
                           f"{ev.window}", "set evaluation.window to the window length to score, such as 512")
    if ev.max_tokens < 0:
        raise ProfileError(f"{where}evaluation.max_tokens must be 0 (the whole text) or a token count, got {ev.max_tokens}",
                           f"set evaluation.max_tokens to 0 or at least {2 * ev.window}")
    if ev.max_tokens and ev.max_tokens < 2 * ev.window:
        raise ProfileError(f"{where}evaluation.max_tokens {ev.max_tokens} is less than two windows of {ev.window}",
                           f"set evaluation.max_tokens to at least {2 * ev.window} (or 0 for the whole text)")
    # A reply longer than the llama.cpp runner's chat context (prompt included) cannot be generated there.
    for key, value in (("smoke.max_tokens", profile.smoke.max_tokens),
                       ("chat_checks.max_tokens", profile.chat_checks.max_tokens)):
        if not 1 <= value <= CHAT_CTX:
            raise ProfileError(f"{where}{key} must be between 1 and {CHAT_CTX} tokens, got {value}",
                               f"set {key} to the longest reply to wait for, such as 48")


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


def _renamed(data: dict, old: str, new: str, where: str, deprecated: list[str]) -> dict:
    """`data` with a key's old name read as its new one, and the warning the plan prints for it."""
    if old not in data:
        return data
    if new in data:
        raise ProfileError(f"{where}: both '{new}' and '{old}' are given", f"keep '{new}' only")
    deprecated.append(f"{where}: '{old}:' is the old name of '{new}:'; rename it (it is still read)")
    return {(new if k == old else k): v for k, v in data.items()}


def parse_profile(data: dict, source: str = "<dict>") -> Profile:
    if not isinstance(data, dict):
        raise ProfileError(f"{source}: a profile is a mapping", f"see profiles/{DEFAULT_PROFILE}.yaml")
    keys = ("name", "description", "formats", "evaluation", "smoke", "chat_checks", "bounds", "publish")
    unknown = set(data) - set(keys) - {"backends"}
    if unknown:
        raise ProfileError(f"{source}: unknown profile key(s) {sorted(unknown)}", f"allowed: {', '.join(keys)}")
    deprecated: list[str] = []
    data = _renamed(data, "backends", "formats", source, deprecated)
    if isinstance(data.get("evaluation"), dict):
        data = {**data, "evaluation": _renamed(data["evaluation"], "ctx", "window", f"{source}: evaluation", deprecated)}
    formats = data.get("formats") or {}
    if not isinstance(formats, dict) or not formats:
        raise ProfileError(f"{source}: 'formats' must map format names to options",
                           "`quantkit formats` lists them; profiles/ has examples")
    evaluation = load_options(EvalOptions, data.get("evaluation"), f"{source}: evaluation")
    parse_precision(evaluation.precision)
    if evaluation.reference not in REFERENCE_MODES:
        raise ProfileError(f"{source}: evaluation.reference must be one of {', '.join(REFERENCE_MODES)}, "
                           f"got {evaluation.reference!r}", "fix the profile")
    checks = load_options(ChatChecks, data.get("chat_checks"), f"{source}: chat_checks")
    check_tools(checks.tools, f"{source}: chat_checks.tools")
    check_schema(checks.json_schema, f"{source}: chat_checks.json_schema")
    return Profile(
        name=str(data.get("name") or Path(source).stem),
        description=str(data.get("description") or ""),
        formats={k: dict(v or {}) for k, v in formats.items()},
        deprecated=tuple(deprecated),
        evaluation=evaluation,
        smoke=load_options(SmokeOptions, data.get("smoke"), f"{source}: smoke"),
        chat_checks=checks,
        bounds=parse_bounds(data.get("bounds"), f"{source}: bounds"),
        publish=load_options(PublishOptions, data.get("publish"), f"{source}: publish"),
        source_file=source,
    )
