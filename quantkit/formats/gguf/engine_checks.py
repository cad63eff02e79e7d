"""A GGUF's chat setup checked in llama.cpp's own engine: its template rendered by llama-server, and a tool call
parsed by llama-server's own parser.

evaluate/integrity.py renders every artifact's template with jinja2, as transformers does. The apps that load a
GGUF render it with llama.cpp's Jinja engine (common/jinja/), which implements its own subset of the language;
a template can render in jinja2 and fail or differ there. So each GGUF is started in llama-server and:

- the integrity conversations (system + user, multi-turn, tools, an assistant tool call then a `tool` message)
  go through `POST /apply-template`; each must equal the source's transformers rendering byte for byte. A
  difference fails the file, naming the conversation and the first differing bytes; a template the engine
  cannot parse fails with the engine's own message.
- the source's tool call (the fp16 reference's tool-call probe when it made one, else a fixed call), written in
  Hermes form `<tool_call>{json}</tool_call>`, goes through `POST /v1/chat/completions` with `tools=[...]` as
  the assistant's prefilled turn. llama-server lets the model end the turn (one token, pushed to its
  end-of-turn token) and parses the whole turn with the parser it derived from the file's template; the check
  reads back `tool_calls`. A template whose
  engine finds no tool-call format in it answers "no": that is reported, not failed (the source's template may
  have no tool support at all, as the sample's has not).
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

from ...evaluate.integrity import CONVERSATIONS, ChatFacts, EngineVerdict
from ...evaluate.probes import WEATHER_TOOL
from .server import EngineError, LlamaServer

# The call sent when the source made none: the integrity conversations' own.
CANNED_CALL = {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}
_ASK = {"role": "user", "content": "What is the weather in Paris?"}


def hermes_call(call: dict) -> str:
    """A call as Hermes-format models write it (and llama.cpp's parsers read it)."""
    return "<tool_call>\n" + json.dumps({"name": call["name"], "arguments": call["arguments"]}) + "\n</tool_call>"


def check_file(path: Path, source: ChatFacts, call: dict | None, threads: int, engine: str,
               template_file: Path | None = None) -> EngineVerdict:
    """Start llama-server on the file and run both checks (seconds: the whole of it, the server's start included).
    `template_file`: check that template instead of the file's own (retemplate, before it rewrites anything)."""
    start = time.monotonic()
    try:
        with LlamaServer(path, threads, template_file=template_file) as server:
            verdict = check_in_engine(server, source, call, engine)
    except EngineError as e:  # it would not start on this template: nothing renders, nothing parses
        verdict = EngineVerdict(engine=engine, template=[f"llama.cpp's template engine rejects the template: "
                                                         f"{e.engine_message}"], tool_calls=False,
                                tool_call_detail="not tried: the server does not start with this template",
                                call_source=_call_source(call))
    return replace(verdict, seconds=round(time.monotonic() - start, 2))


def check_in_engine(server: LlamaServer, source: ChatFacts, call: dict | None, engine: str) -> EngineVerdict:
    """Run both checks against a started server. `call`: the source's tool call ({name, arguments}), or None."""
    # A source without a template has nothing to compare with: llama-server then falls back to a built-in one
    # (ChatML), and integrity.py already says whether the file has a template the source has not.
    template = [f for name in CONVERSATIONS if (f := _render_failure(server, source, name))] if source.template else []
    ok, detail = _tool_call(server, call or CANNED_CALL, source)
    return EngineVerdict(engine=engine, template=template, tool_calls=ok, tool_call_detail=detail,
                         call_source=_call_source(call))


def _call_source(call: dict | None) -> str:
    return "the fp16 source's reply" if call else "a fixed call (the source made none)"


def _render_failure(server: LlamaServer, source: ChatFacts, name: str) -> str:
    conv = CONVERSATIONS[name]
    body = {"messages": _openai_messages(conv["messages"]), **({"tools": conv["tools"]} if conv.get("tools") else {})}
    try:
        ours = server.post("/apply-template", body)["prompt"]
    except EngineError as e:
        return f"llama-server cannot render {name!r}: {e.engine_message}"
    theirs = source.render(name)
    if theirs.startswith("<error:"):
        return ""  # the source's own template cannot render it: nothing to compare with (integrity says so)
    a, b = ours.encode(), theirs.encode()
    if a == b:
        return ""
    at = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return (f"llama-server renders {name!r} differently from the source's transformers rendering: at byte {at} "
            f"it has {a[at:at + 40]!r}, the source {b[at:at + 40]!r}")


def _openai_messages(messages: list[dict]) -> list[dict]:
    """The conversation as an OpenAI client sends it: a tool call's arguments are a JSON string (transformers'
    templates take them as an object; llama-server parses the string back into one before rendering)."""
    out = []
    for m in messages:
        if m.get("tool_calls"):
            m = {**m, "tool_calls": [{**c, "function": {**c["function"], "arguments": json.dumps(c["function"]["arguments"])}}
                                     for c in m["tool_calls"]]}
        out.append(m)
    return out


def _tool_call(server: LlamaServer, call: dict, source: ChatFacts) -> tuple[bool, str]:
    # The model's one generated token is pushed to the end-of-turn token, so the turn the parser reads is the
    # call as sent, ended as the model ends a turn; what a small model would babble after it is not the question.
    end = source.special.get(source.end_of_turn() or "")
    body = {"messages": [_ASK, {"role": "assistant", "content": hermes_call(call)}], "tools": [WEATHER_TOOL],
            "max_tokens": 1, "temperature": 0, **({"logit_bias": [[end, 100]]} if end is not None else {})}
    try:
        reply = server.post("/v1/chat/completions", body)
    except EngineError as e:
        return False, f"llama-server refused the turn: {e.engine_message}"
    message = (reply.get("choices") or [{}])[0].get("message") or {}
    calls = message.get("tool_calls") or []
    if not calls:
        return False, f"no tool_calls; the turn came back as content {str(message.get('content'))[:120]!r}"
    fn = calls[0].get("function") or {}
    try:
        arguments = json.loads(fn.get("arguments") or "null")
    except ValueError:
        return False, f"tool_calls[0].arguments is not JSON: {fn.get('arguments')!r}"
    if fn.get("name") != call["name"] or arguments != call["arguments"]:
        return False, f"tool_calls[0] is {fn.get('name')}({arguments}), the turn sent {call['name']}({call['arguments']})"
    return True, f"{call['name']}({json.dumps(call['arguments'])}) came back as tool_calls"
