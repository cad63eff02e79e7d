"""Render a model's own chat template, the way the runtimes that load it will."""

from __future__ import annotations

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment


def render_chat(template: str, messages: list[dict[str, str]], *, bos_token: str = "", eos_token: str = "") -> str:
    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(
        messages=messages, add_generation_prompt=True, bos_token=bos_token, eos_token=eos_token,
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
