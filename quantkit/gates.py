"""Quality bounds that stop a bad release: per variant, per format or per bits, on the measured numbers.

A profile lists rules; every rule an artifact matches must hold. A failed bound fails the build (exit 7,
the files and reports are still written) and `quantkit publish` refuses the build unless told otherwise.
Template and stop-token integrity (evaluate/integrity.py) fails an artifact whatever the rules say.
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING

from .errors import ProfileError

if TYPE_CHECKING:  # results -> plan -> profiles -> gates
    from .results import Built, Measured

_LIMITS = ("max_kld", "max_kld_p99", "min_top1", "max_ppl_delta_pct")


@dataclass(frozen=True)
class Bound:
    """Which artifacts (all, when no selector is given) and what they must measure."""

    variants: tuple[str, ...] = ()  # names or shell patterns: Q4_K_M, "Q[23]_*", "4bit-*"
    formats: tuple[str, ...] = ()  # format names: gguf, gptq, awq, exl2
    min_bits: float = 0.0  # bits per parameter, as the report's Bits/param column
    max_bits: float = float("inf")
    max_kld: float | None = None
    max_kld_p99: float | None = None
    min_top1: float | None = None  # a fraction: 0.9 for 90%
    max_ppl_delta_pct: float | None = None
    tool_calls: bool = False  # the tool-call probe must agree with the source
    json_mode: bool = False  # the JSON-mode probe must agree with the source

    def matches(self, a: Built) -> bool:
        return ((not self.variants or any(fnmatchcase(a.variant.upper(), v.upper()) for v in self.variants))
                and (not self.formats or a.backend in self.formats)
                and self.min_bits <= a.bits_per_weight <= self.max_bits)

    def describe(self) -> str:
        sel = [", ".join(self.variants) if self.variants else "", ", ".join(self.formats) if self.formats else "",
               f"{self.min_bits:g}+ bits" if self.min_bits else "", f"≤{self.max_bits:g} bits" if self.max_bits != float("inf") else ""]
        need = [f"KLD ≤ {self.max_kld:g}" if self.max_kld is not None else "",
                f"KLD p99 ≤ {self.max_kld_p99:g}" if self.max_kld_p99 is not None else "",
                f"top-1 ≥ {100 * self.min_top1:g}%" if self.min_top1 is not None else "",
                f"ΔPPL ≤ {self.max_ppl_delta_pct:g}%" if self.max_ppl_delta_pct is not None else "",
                "tool calls as the source" if self.tool_calls else "", "JSON mode as the source" if self.json_mode else ""]
        return f"{'; '.join(s for s in sel if s) or 'every variant'}: {', '.join(n for n in need if n) or 'nothing'}"


def parse_bounds(data, where: str) -> tuple[Bound, ...]:
    """The profile's `bounds:` list; a limit that is not a number is an error now, not at the end of a build."""
    if data is None:
        return ()
    if not isinstance(data, list):
        raise ProfileError(f"{where} must be a list of rules", "e.g. bounds: [{variants: [VARIANT], max_kld: 0.05}]")
    fields = Bound.__dataclass_fields__
    out = []
    for i, rule in enumerate(data):
        at = f"{where}[{i}]"
        if not isinstance(rule, dict):
            raise ProfileError(f"{at} must be a mapping", "e.g. {variants: [VARIANT], max_kld: 0.05}")
        if unknown := set(rule) - set(fields):
            raise ProfileError(f"{at}: unknown key(s) {sorted(unknown)}", f"allowed: {', '.join(fields)}")
        values = {}
        for key, value in rule.items():
            if key in ("variants", "formats"):
                value = [value] if isinstance(value, str) else value
                if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                    raise ProfileError(f"{at}.{key} must be a list of names, got {value!r}", "fix the profile")
                value = tuple(value)
            elif key in ("tool_calls", "json_mode"):
                if not isinstance(value, bool):
                    raise ProfileError(f"{at}.{key} must be true or false, got {value!r}", "fix the profile")
            elif isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ProfileError(f"{at}.{key} must be a number, got {value!r}", "fix the profile")
            elif key == "min_top1" and not 0 <= value <= 1:
                raise ProfileError(f"{at}.min_top1 is a fraction, got {value!r}", "write 0.9 for 90%")
            else:
                value = float(value)
            values[key] = value
        out.append(Bound(**values))
    return tuple(out)


def bound_failures(artifact: Measured, bounds: tuple[Bound, ...]) -> list[str]:
    """What fails for one artifact: its integrity, then every matching bound. A bound that cannot be checked
    (nothing measured the number it limits) fails too, saying why: a release gate that passes what it never saw
    would publish an unmeasured file as a checked one."""
    e = artifact.evaluation
    failures = [f"chat integrity: {m}" for m in artifact.integrity]
    if not artifact.is_model:
        return failures
    for b in (b for b in bounds if b.matches(artifact)):
        if e is None:
            failures.append(f"not measured, so its bound cannot be checked (evaluation.enabled is false, or the "
                            f"format has no evaluation runner; {b.describe()})")
            continue
        for key, measured, limit, worse in (
                ("KLD", e.kld_mean, b.max_kld, lambda m, x: m > x),
                ("KLD p99", e.kld_p99, b.max_kld_p99, lambda m, x: m > x),
                ("top-1", e.top1_agreement, b.min_top1, lambda m, x: m < x),
                ("ΔPPL %", e.ppl_delta_pct, b.max_ppl_delta_pct, lambda m, x: m > x)):
            if limit is None:
                continue
            if measured is None:
                failures.append(f"{key} was not measured, so its bound cannot be checked ({b.describe()})")
            elif worse(measured, limit):
                failures.append(f"{key} {measured:.4g} (bound {'≥' if key == 'top-1' else '≤'} {limit:g}; {b.describe()})")
        for probe, needed in (("tool_call", b.tool_calls), ("json_mode", b.json_mode)):
            r = e.probes.get(probe)
            if not needed:
                continue
            if r is None:
                failures.append(f"{probe.replace('_', ' ')}: no probe ran, so its bound cannot be checked (chat_checks "
                                f"are off, or the source has no chat template; {b.describe()})")
            elif not r.get("agrees"):
                failures.append(f"{probe.replace('_', ' ')}: {r.get('agreement')} (bound: as the source; {b.describe()})")
    return failures
