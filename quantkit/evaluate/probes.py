"""Tool-call and JSON-mode probes: one greedy reply each, parsed and validated against its JSON schema, then
compared with the fp16 source's reply to the same prompt. A quant is released when it behaves like its
source; what the source itself did is reported as it is (a 135M model may make no valid call at all).

The prompts are rendered here, once, from the source's template; the integrity check makes sure each
artifact's own template renders them the same way.
"""

from __future__ import annotations

import ast
import json
import re
from dataclasses import asdict, dataclass

from ..errors import ProfileError

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city.",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "description": "The city, e.g. Paris"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}, "required": ["city"]},
    },
}
CAPITAL_SCHEMA = {"type": "object", "properties": {"country": {"type": "string"}, "capital": {"type": "string"}},
                  "required": ["country", "capital"]}

# Hermes 2 Pro's system prompts (from its model card), for templates with no tool support of their own.
HERMES_TOOLS = (
    "You are a function calling AI model. You are provided with function signatures within <tools></tools> XML tags. "
    "You may call one or more functions to assist with the user query. Don't make assumptions about what values to "
    "plug into functions. Here are the available tools: <tools> {tools} </tools> Use the following pydantic model json "
    "schema for each tool call you will make: {{'title': 'FunctionCall', 'type': 'object', 'properties': {{'arguments': "
    "{{'title': 'Arguments', 'type': 'object'}}, 'name': {{'title': 'Name', 'type': 'string'}}}}, 'required': "
    "['arguments', 'name']}} For each function call return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags as follows:\n<tool_call>\n{{'arguments': <args-dict>, 'name': <function-name>}}\n"
    "</tool_call>")
HERMES_JSON = ("You are a helpful assistant that answers in JSON. Here's the json schema you must adhere to:\n<schema>\n"
               "{schema}\n<schema>")

@dataclass
class ProbeResult:
    reply: str
    parsed: bool  # a tool call / JSON object could be read from the reply
    valid: bool  # ... and it satisfies the function's (the JSON mode's) schema
    value: object = None  # the call ({name, arguments}) or the JSON object
    error: str = ""
    agrees: bool | None = None  # same outcome as the fp16 source (None: this is the source)
    agreement: str = ""  # what agrees means here, in words


def check_schema(schema: object, where: str) -> None:
    """Plan time: a schema jsonschema cannot use is the profile's error, not a failed probe."""
    from jsonschema import SchemaError, validators

    if not isinstance(schema, dict):
        raise ProfileError(f"{where} must be a JSON Schema object, got {schema!r}", "fix the profile")
    try:
        validators.validator_for(schema).check_schema(schema)
    except SchemaError as e:
        raise ProfileError(f"{where} is not a valid JSON Schema: {e.message}", "fix the profile") from e


def check_tools(tools: object, where: str) -> None:
    if not isinstance(tools, list) or not tools:
        raise ProfileError(f"{where} must be a list of tools", "see WEATHER_TOOL in quantkit/evaluate/probes.py")
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or not fn.get("name"):
            raise ProfileError(f"{where}[{i}] has no function.name", 'write {type: function, function: {name, parameters}}')
        check_schema(fn.get("parameters", {"type": "object"}), f"{where}[{i}].function.parameters")


def prompts(facts, opts) -> dict[str, str]:
    """Each probe's prompt through the source's template: with tools=[...] when the template uses them,
    else with Hermes 2 Pro's system prompts."""
    render = facts.render_messages
    user = {"role": "user", "content": opts.tool_question}
    if "tools" in (facts.template or ""):
        tool_prompt = render([user], opts.tools)
    else:
        listed = " ".join(str(t) for t in opts.tools)  # the card shows Python reprs: that is what it was trained on
        tool_prompt = render([{"role": "system", "content": HERMES_TOOLS.format(tools=listed)}, user])
    schema = json.dumps(opts.json_schema)
    json_prompt = render([{"role": "system", "content": HERMES_JSON.format(schema=schema)},
                          {"role": "user", "content": opts.json_question}])
    return {"tool_call": tool_prompt, "json_mode": json_prompt}


def _load(text: str):
    """JSON, or the Python dict literal Hermes' card shows ({'arguments': ..., 'name': ...}); never eval."""
    try:
        return json.loads(text)
    except ValueError:
        return ast.literal_eval(text)


def _first_object(text: str):
    start = text.find("{")
    if start < 0:
        raise ValueError("no JSON object in the reply")
    return json.JSONDecoder().raw_decode(text[start:])[0]


def _validate(value, schema: dict) -> str:
    from jsonschema import validators

    errors = sorted(validators.validator_for(schema)(schema).iter_errors(value), key=lambda e: list(e.path))
    return errors[0].message if errors else ""


def verdict(probe: str, reply: str, opts) -> ProbeResult:
    """Parse and validate one reply."""
    try:
        if probe == "tool_call":
            m = re.search(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", reply, re.S)
            if not m:
                return ProbeResult(reply, False, False, error="no <tool_call> in the reply")
            call = _load(m.group(1))
            if not isinstance(call, dict):
                raise ValueError("the tool call is not an object")
        else:
            call = _first_object(reply)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as e:
        return ProbeResult(reply, False, False, error=f"unparseable: {str(e).splitlines()[0][:80]}")
    if probe == "json_mode":
        err = _validate(call, opts.json_schema)
        return ProbeResult(reply, True, not err, call, err)
    call = {"name": call.get("name"), "arguments": call.get("arguments")}
    tool = next((t["function"] for t in opts.tools if t["function"]["name"] == call["name"]), None)
    if tool is None:
        return ProbeResult(reply, True, False, call, f"no tool named {call['name']!r}")
    err = _validate(call["arguments"], tool.get("parameters", {"type": "object"}))
    return ProbeResult(reply, True, not err, call, err)


def compare(result: ProbeResult, source: ProbeResult) -> ProbeResult:
    """Agreement with the source: the same call or JSON (compared as values); where the source produced
    nothing parseable, agreeing means producing nothing parseable either."""
    if source.parsed:
        result.agrees = result.parsed and result.value == source.value
        result.agreement = "same as the source" if result.agrees else "differs from the source"
    else:
        result.agrees = not result.parsed
        result.agreement = "none parsed, like the source" if result.agrees else "parsed where the source did not"
    return result


def compare_replies(replies: dict[str, str], opts, source: dict[str, dict] | None) -> dict[str, dict]:
    """{probe: ProbeResult as a dict} for one runner's replies; `source`: the reference's, to compare with."""
    out = {}
    for probe, reply in replies.items():
        r = verdict(probe, reply, opts)
        if source is not None and probe in source:
            compare(r, ProbeResult(**source[probe]))
        out[probe] = asdict(r)
    return out


def describe(r: dict) -> str:
    """'valid call get_weather(city=Paris)' / 'unparseable: ...', for reports."""
    if not r["parsed"]:
        return r["error"] or "nothing parsed"
    v = r["value"]
    shown = (f"{v.get('name')}({json.dumps(v.get('arguments'), ensure_ascii=False)})" if isinstance(v, dict) and "arguments" in v
             else json.dumps(v, ensure_ascii=False))
    return f"{'valid' if r['valid'] else 'invalid'} {shown[:120]}" + (f" ({r['error']})" if r["error"] else "")
