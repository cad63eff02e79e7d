"""Render a model's own chat template, the way the runtimes that load it will."""

from __future__ import annotations

import json
from datetime import datetime

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment


# Tokens of context for a chat turn in the llama.cpp runner (the probes' prompts run to several hundred).
CHAT_CTX = 2048


def _tojson(value, indent=None, separators=None, sort_keys=False, ensure_ascii=False) -> str:
    # transformers' filter, not jinja2's (which escapes <, > and & for HTML): tool templates render with it.
    return json.dumps(value, indent=indent, separators=separators, sort_keys=sort_keys, ensure_ascii=ensure_ascii)


def render_chat(template: str, messages: list[dict], *, bos_token: str = "", eos_token: str = "",
                tools: list[dict] | None = None, add_generation_prompt: bool = True) -> str:
    """Render as transformers' apply_chat_template does (the same sandbox, filters and variables)."""
    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template).render(
        messages=messages, tools=tools, add_generation_prompt=add_generation_prompt, bos_token=bos_token,
        eos_token=eos_token,
    )


def smoke_verdict(reply: str, end_token: str | None, prompt: str, opts: dict) -> dict:
    """Pass when the turn ended (an end-of-generation token) within the cap and the reply has the answer."""
    has_answer = opts["expect"].lower() in reply.lower()
    if end_token is None:
        reason = f"no end-of-turn token within {opts['max_tokens']} tokens"
    elif not has_answer:
        reason = f"reply does not contain {opts['expect']!r}"
    else:
        reason = f"ended with {end_token}, contains {opts['expect']!r}"
    return {"passed": end_token is not None and has_answer, "reply": reply, "end_token": end_token,
            "reason": reason, "prompt": prompt}


def smoke_messages(system: str, question: str) -> list[dict]:
    """The smoke test's conversation, as every runner renders it (and the plan, to time it)."""
    return [{"role": "system", "content": system}, {"role": "user", "content": question}]


def chat_turns(generate, render, spec: dict, missing: str = "the artifact has no chat template",
               generate_many=None) -> dict:
    """The smoke test and the probes of one runner. `generate(prompt, max_tokens, special=True)` decodes
    greedily and returns (reply, end-of-turn token or None); `render(messages)` is the artifact's own template
    (None: it has none, and `missing` says so). The probes' prompts come rendered, from the source's template (evaluate/probes.py).
    `generate_many([(prompt, max_tokens, special), ...])`, if given, answers all the turns in one go (the reference
    decodes them as one batch: evaluate/hf_runner.py) and replaces `generate`.
    `chat: false` in the spec: none of it (a later round of scoring, whose chat turns are already known); `smoke:
    null`: the probes only (a runner whose smoke test runs in another runtime)."""
    if spec.get("chat") is False:
        return {}
    out: dict = {}
    turns: list[tuple[str, str, int, bool]] = []  # (what, prompt, max tokens, special tokens in the reply)
    if (opts := spec.get("smoke")) is not None:
        if render is None:
            out["smoke"] = {"passed": False, "reply": "", "reason": missing, "prompt": ""}
        else:
            prompt = render(smoke_messages(opts["system"], opts["question"]))
            turns.append(("smoke", prompt, opts["max_tokens"], False))
    turns += [(f"probe:{name}", prompt, spec["probe_tokens"], True) for name, prompt in (spec.get("probes") or {}).items()]
    many = generate_many or (lambda asked: [generate(*turn) for turn in asked])
    replies = many([turn[1:] for turn in turns]) if turns else []
    for (what, prompt, _, _), (reply, end_token) in zip(turns, replies):
        if what == "smoke":
            out["smoke"] = smoke_verdict(reply, end_token, prompt, opts)
        else:
            out.setdefault("probes", {})[what.removeprefix("probe:")] = reply
    return out
