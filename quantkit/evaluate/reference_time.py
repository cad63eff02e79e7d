"""How long the fp16 reference takes, predicted before anything runs: its scoring, and its chat turns (the smoke test
and the tool-call and JSON-mode probes), which at 7B and beyond can cost more than the scoring itself.

Each phase is a rate measured on this kind of machine (2 cores, scripts/bench_reference.py at 3B and 7B,
docs/benchmarks.md, "The reference's chat turns") times what the plan knows without loading weights:
- scoring runs every window token through the model in float32: seconds per token per parameter;
- each chat prompt is read once in float32, the same way: seconds per prompt token per parameter;
- the replies are decoded together, one batch step per generated position, each step reading every 16-bit weight
  once (evaluate/hf_runner.py generate_batch): seconds per step per byte of weights.
For a MoE every parameter is counted, although a token runs only its routed experts: an upper bound, for the
scoring and the chat turns alike.
"""

from __future__ import annotations

from dataclasses import dataclass

# Fitted to the 3B and 7B synthetic checkpoints (fp16; docs/benchmarks.md; each phase within 10% at both): float32
# scoring (measured 2.15e-11 and 1.88e-11), float32 prompts (each prompt widens the whole model once more: 3.04e-11
# and 2.42e-11), and batched fp16 decode steps (1.40e-10 and 1.22e-10 a byte). bf16 decodes faster on CPUs with
# AVX512-BF16, so for bf16 sources the decode term is on the safe side.
SCORE_S_PER_TOKEN_PARAM = 2.0e-11
PROMPT_S_PER_TOKEN_PARAM = 2.7e-11
DECODE_S_PER_STEP_BYTE = 1.3e-10
DECODE_S_PER_STEP = 0.04  # generate's own work a step, whatever the size (the sample's steps: 0.08 s)
# What the plan counts a prompt's tokens as before any tokenizer runs (the sample's three prompts: 4.0).
CHARS_PER_TOKEN = 4


@dataclass(frozen=True)
class ReferenceTime:
    """The reference's predicted time on a 2-core machine, by phase."""

    scored_tokens: int  # window tokens run through the model (all of each window, as the scoring does)
    score_seconds: float
    prompt_tokens: int  # the chat prompts, estimated from their rendered length
    replies: dict[str, int]  # each chat turn -> the most tokens its reply may take
    chat_seconds: float

    @property
    def generated_tokens(self) -> int:
        return sum(self.replies.values())

    @property
    def dominates(self) -> bool:
        """The chat turns would take longer than the scoring they come with."""
        return self.chat_seconds > self.score_seconds

    def render(self) -> list[str]:
        if not self.replies:
            return [f"reference time: scoring {self.scored_tokens:,} tokens ~{_took(self.score_seconds)} on 2 cores; "
                    "no chat turns"]
        turns = ", ".join(f"{name} {n}" for name, n in self.replies.items())
        lines = [f"reference time: scoring {self.scored_tokens:,} tokens ~{_took(self.score_seconds)}; chat turns "
                 f"~{_took(self.chat_seconds)} ({self.prompt_tokens:,} prompt tokens, up to {self.generated_tokens} "
                 f"generated: {turns}), on 2 cores"]
        if self.dominates:
            lines.append(f"  the chat turns would take {self.chat_seconds / self.score_seconds:.1f}x the reference's "
                         "scoring: give fewer tokens (smoke.max_tokens, chat_checks.max_tokens), turn the probes off "
                         "(chat_checks.enabled: false), or let the reference only score (evaluation.reference: "
                         "streamed: no source replies to compare with)")
        return lines


def predict(params: int, weight_bytes: int, scored_tokens: int, prompts: list[str], replies: dict[str, int]) -> ReferenceTime:
    """`prompts`: the chat turns' rendered prompts; `replies`: each turn's token cap (empty: the reference does not
    generate, as when it is streamed)."""
    prompt_tokens = sum(-(-len(p) // CHARS_PER_TOKEN) for p in prompts) if replies else 0
    steps = max(replies.values(), default=0)  # one batch: as many steps as the longest reply
    chat = prompt_tokens * params * PROMPT_S_PER_TOKEN_PARAM + steps * (weight_bytes * DECODE_S_PER_STEP_BYTE + DECODE_S_PER_STEP)
    return ReferenceTime(scored_tokens, scored_tokens * params * SCORE_S_PER_TOKEN_PARAM, prompt_tokens, replies, chat)


def _took(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 90 else f"{seconds:.0f} s"
