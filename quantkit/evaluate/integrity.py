"""Template and stop-token integrity: what an artifact tells its runtime about chat (its template, BOS, EOS,
the tokens that end a turn, its special tokens), checked against the source. A quant that renders a prompt
differently, or never stops because its end-of-turn token is not one, is broken whatever its perplexity.

Read from the files a runtime reads: a folder's tokenizer files (transformers, vLLM, exllamav2 and mlx-lm
read the same ones) here; a format whose runtime reads something else says so (Format.chat_facts).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from jinja2.exceptions import TemplateError

from ..errors import SourceError
from .chat import render_chat
from .probes import WEATHER_TOOL

# The files of a Hugging Face folder that say how to chat with it (never weights): what folder_facts reads, and
# what `quantkit retemplate --from` takes from a source revision.
TOKENIZER_FILES = ("tokenizer_config.json", "chat_template.jinja", "chat_template.json", "generation_config.json",
                   "special_tokens_map.json", "tokenizer.json")

_CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}}

# The fixed conversations every artifact's template must render exactly as the source's does.
CONVERSATIONS: dict[str, dict] = {
    "system + user": {"messages": [{"role": "system", "content": "You are a helpful assistant."},
                                   {"role": "user", "content": "What is the capital of France?"}]},
    "multi-turn": {"messages": [{"role": "system", "content": "You are a helpful assistant."},
                                {"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello! How can I help?"},
                                {"role": "user", "content": "Name a colour."}]},
    "tools": {"messages": [{"role": "user", "content": "What is the weather in Paris?"}], "tools": [WEATHER_TOOL]},
    "tool response": {"messages": [{"role": "user", "content": "What is the weather in Paris?"},
                                   {"role": "assistant", "content": "", "tool_calls": [_CALL]},
                                   {"role": "tool", "name": "get_weather", "content": '{"temperature": 18}'}],
                      "tools": [WEATHER_TOOL]},
}
_TURN = {"messages": [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "QUANTKIT-REPLY"}],
         "add_generation_prompt": False}


@dataclass(frozen=True)
class ChatFacts:
    """An artifact's chat setup as its runtime reads it."""

    template: str | None
    tokens: dict[str, int | None]  # "bos", "eos" (and "eot" for GGUF) -> id
    special: dict[str, int]  # special (control) token text -> id
    stop_ids: frozenset[int] | None = None  # the ids generation stops at (None: not known from the files)
    texts: dict[int, str] = field(default_factory=dict)  # id -> text, for the tokens named above

    def text(self, token_id: int | None) -> str:
        return "none" if token_id is None else f"{token_id} ({self.texts.get(token_id, '?')})"

    def render(self, name: str) -> str:
        """One fixed conversation through this template; a template that raises renders as its error."""
        conv = CONVERSATIONS.get(name) or _TURN
        try:
            return self.render_messages(conv["messages"], conv.get("tools"), conv.get("add_generation_prompt", True))
        except (TemplateError, TypeError, ValueError) as e:
            return f"<error: {e}>"

    def render_messages(self, messages: list[dict], tools: list | None = None, add_generation_prompt: bool = True) -> str:
        """Any chat through this template, with this vocabulary's BOS and EOS texts."""
        return render_chat(self.template or "", messages, tools=tools, add_generation_prompt=add_generation_prompt,
                           bos_token=self.texts.get(self.tokens.get("bos"), ""),
                           eos_token=self.texts.get(self.tokens.get("eos"), ""))

    def to_json(self) -> dict:
        """As a manifest keeps it (a --store build records what the node read from the artifact)."""
        return {"template": self.template, "tokens": self.tokens, "special": self.special,
                "stop_ids": None if self.stop_ids is None else sorted(self.stop_ids),
                "texts": {str(k): v for k, v in self.texts.items()}}

    @classmethod
    def from_json(cls, data: dict) -> "ChatFacts":
        stop = data.get("stop_ids")
        return cls(data.get("template"), dict(data.get("tokens") or {}), dict(data.get("special") or {}),
                   None if stop is None else frozenset(stop), {int(k): v for k, v in (data.get("texts") or {}).items()})

    def end_of_turn(self) -> str | None:
        """The special token the template puts after an assistant reply (<|im_end|> for ChatML)."""
        turn = self.render("turn")
        if "QUANTKIT-REPLY" not in turn:
            return None
        after = turn.split("QUANTKIT-REPLY", 1)[1]
        return max((t for t in self.special if after.startswith(t)), key=len, default=None)


@dataclass(frozen=True)
class EngineVerdict:
    """What an artifact's runtime engine made of its chat setup (Format.engine_check; GGUF: llama-server,
    formats/gguf/engine_checks.py). report.json's `engine` of an artifact."""

    engine: str  # the engine's identity (llama-server: its version line and binary hash)
    template: list[str] = field(default_factory=list)  # failures: a conversation rendered otherwise, or an engine error
    tool_calls: bool | None = None  # its parser returned the call as tool_calls, same name and arguments
    tool_call_detail: str = ""  # what came back, in words
    call_source: str = ""  # "the fp16 source's reply" or "a fixed call" (the source made none)
    seconds: float = 0.0

    def summary(self) -> str:
        """The report's cell: 'template ok, tool calls: yes'."""
        return (("template ok" if not self.template else "template DIFFERS") + ", tool calls: "
                + {True: "yes", False: "no", None: "—"}[self.tool_calls])


@dataclass(frozen=True)
class Mismatch:
    field: str
    artifact: str
    source: str

    def render(self) -> str:
        return f"{self.field}: {self.artifact}, the source has {self.source}"


def folder_facts(folder: Path) -> ChatFacts:
    """A Hugging Face folder's tokenizer files, as transformers reads them (with generation_config's EOS list)."""
    def load(name: str) -> dict:
        f = folder / name
        return json.loads(f.read_text()) if f.is_file() else {}

    cfg, tok_json, gen = load("tokenizer_config.json"), load("tokenizer.json"), load("generation_config.json")
    special = {t["content"]: t["id"] for t in tok_json.get("added_tokens", []) if t.get("special")}
    special |= {v["content"]: int(k) for k, v in (cfg.get("added_tokens_decoder") or {}).items() if v.get("special")}
    vocab = (tok_json.get("model") or {}).get("vocab")
    ids = dict(vocab) if isinstance(vocab, dict) else {}
    ids |= special

    def token_id(key: str) -> int | None:
        value = cfg.get(key)
        value = value.get("content") if isinstance(value, dict) else value
        return ids.get(value) if value else None

    tokens = {"bos": token_id("bos_token"), "eos": token_id("eos_token")}
    eos = gen.get("eos_token_id", tokens["eos"])
    stops = {*(eos if isinstance(eos, list) else [eos]), tokens["eos"]} - {None}
    texts = {i: t for t, i in special.items()} | {i: t for t, i in ids.items() if i in tokens.values()}
    return ChatFacts(template=_folder_template(folder, cfg), tokens=tokens, special=special,
                     stop_ids=frozenset(stops), texts=texts)


def _folder_template(folder: Path, cfg: dict) -> str | None:
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    value = cfg.get("chat_template")
    if isinstance(value, list):  # named templates: the default one is what runtimes use
        value = next((t["template"] for t in value if t.get("name") == "default"), None)
    return value


def mismatches(source: ChatFacts, artifact: ChatFacts) -> list[Mismatch]:
    """Every field where the artifact would behave differently from the source in a chat."""
    out = []
    if not artifact.template:
        if source.template:
            out.append(Mismatch("chat template", "none", "one"))
    else:
        differ = [name for name in CONVERSATIONS if artifact.render(name) != source.render(name)]
        if differ:
            ours, theirs = artifact.render(differ[0]), source.render(differ[0])
            at = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
            out.append(Mismatch("chat template", f"renders {len(differ)} of {len(CONVERSATIONS)} conversations "
                                f"differently ({', '.join(differ)}); {differ[0]!r} has {ours[at:at + 30]!r} at character {at}",
                                repr(theirs[at:at + 30])))
    for key in ("bos", "eos"):
        a, s = artifact.tokens.get(key), source.tokens.get(key)
        if s is not None and artifact.texts.get(a) != source.texts.get(s):
            out.append(Mismatch(f"{key.upper()} token", artifact.text(a), source.text(s)))
    end = source.end_of_turn()
    if end is not None and artifact.stop_ids is not None:
        end_id = artifact.special.get(end)
        if end_id is None or end_id not in artifact.stop_ids:
            out.append(Mismatch("end of turn", f"{end} does not end generation" if end_id is not None else f"no {end} token",
                                f"{end} as an end-of-generation token"))
    extra, missing = set(artifact.special) - set(source.special), set(source.special) - set(artifact.special)
    moved = [t for t in set(artifact.special) & set(source.special) if artifact.special[t] != source.special[t]]
    if extra or missing or moved:
        what = "; ".join(x for x in (f"missing {sorted(missing)}" if missing else "", f"extra {sorted(extra)}" if extra else "",
                                     f"other ids for {sorted(moved)}" if moved else "") if x)
        out.append(Mismatch("special tokens", what, f"{len(source.special)} special tokens"))
    return out


def render_error(facts: ChatFacts) -> str | None:
    """Why the template cannot render a plain system + user chat (jinja2's message), or None when it can."""
    r = facts.render("system + user") if facts.template else ""
    return r[8:-1] if r.startswith("<error:") else None


def check_source_template(source: ChatFacts) -> None:
    """Plan time: the source's template must render a plain chat, or the smoke test and every check fail later."""
    if error := render_error(source):
        raise SourceError(f"the source's chat template fails to render a system + user chat: {error}",
                          "fix chat_template in tokenizer_config.json or chat_template.jinja")
