"""Structured outputs and tools on the wire: parsing the request fields, and compiling what they ask for
into one llguidance grammar that the last stage enforces token by token (:mod:`hexgen.engine.guided`).

Wire fields (each optional; JSON values as JSON text):

- ``response_format``: ``{"type": "text"}``, ``{"type": "json_object"}`` or ``{"type": "json_schema",
  "json_schema": {"name": ..., "schema": {...}, "strict": true}}`` (OpenAI's shape).
- ``guided_json`` (a JSON schema), ``guided_regex`` (a regular expression), ``guided_choice`` (a JSON list of
  strings), ``guided_grammar`` (a Lark grammar, or GBNF, which is converted): vLLM's names.
- ``tools`` (a JSON list of ``{"type": "function", "function": {"name", "description", "parameters"}}``)
  and ``tool_choice`` (``none``, ``auto``, ``required`` or ``{"type": "function", "function": {"name": ...}}``).

At most one output constraint per request; ``tool_choice`` ``required`` or a named function is itself one
(the call's JSON is constrained so that its arguments validate against the function's parameters).

Parsing (:func:`parse_structured`) checks shapes only and runs inline. Compiling (:class:`GrammarCompiler`)
builds the grammar and checks it against the tokenizer, which can take milliseconds for big schemas: the head
runs it in a thread, and keeps the outcome per grammar hash, so a schema is compiled once. A construct the
engine cannot enforce is an ``invalid_request`` naming the field and the construct.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from hexgen.head.tool_prompt import call_grammar
from hexgen.wire.protocol import STRUCTURED_FIELDS as FIELDS
from hexgen.wire.protocol import InvalidRequest

TOOL_CHOICES = ("none", "auto", "required")
MAX_TOOLS = 128
COMPILED_CACHE = 256  # grammar outcomes kept by the head (least recently used dropped)


@dataclass(frozen=True)
class Structured:
    """What a request asks of its output's shape.

    ``kind``: json_object | json_schema | regex | choice | grammar | None (no constraint besides tools);
    ``value``: the schema, regex, choices or grammar text; ``field``: the wire field it came from (errors).
    """

    kind: str | None = None
    value: Any = None
    field: str = ""
    tools: tuple[dict[str, Any], ...] = ()
    tool_choice: str = "auto"  # none | auto | required | function (then ``function`` names it)
    function: str | None = None

    @property
    def calls_tools(self) -> bool:
        """The answer must be a tool call (``required`` or a named function)."""
        return bool(self.tools) and self.tool_choice in ("required", "function")

    @property
    def renders_tools(self) -> bool:
        return bool(self.tools) and self.tool_choice != "none"


def _json(name: str, raw: str) -> Any:
    try:
        return json.loads(raw)
    except RecursionError as e:
        raise InvalidRequest(f"{name}: JSON nested too deeply") from e
    except ValueError as e:
        raise InvalidRequest(f"{name}: not valid JSON ({e})") from e


def _schema(name: str, value: Any) -> dict[str, Any] | bool:
    if not isinstance(value, (dict, bool)):
        raise InvalidRequest(f"{name}: must be a JSON schema (an object)")
    return value


def _response_format(raw: str) -> tuple[str | None, Any, str]:
    rf = _json("response_format", raw)
    kind = rf.get("type") if isinstance(rf, dict) else None
    if kind == "text":
        return None, None, ""
    if kind == "json_object":
        return "json_object", {"type": "object"}, "response_format"
    if kind == "json_schema":
        spec = rf.get("json_schema")
        if not isinstance(spec, dict) or "schema" not in spec:
            raise InvalidRequest(
                'response_format.json_schema: must be an object {"name": ..., "schema": {...}, "strict": ...}'
            )
        strict = spec.get("strict")
        if strict is not None and not isinstance(strict, bool):
            raise InvalidRequest("response_format.json_schema.strict: must be true or false")
        return "json_schema", _schema("response_format.json_schema.schema", spec["schema"]), "response_format"
    raise InvalidRequest('response_format.type: must be one of "text", "json_object", "json_schema"')


def _tools(raw: str) -> tuple[dict[str, Any], ...]:
    value = _json("tools", raw)
    if not isinstance(value, list):
        raise InvalidRequest('tools: must be a JSON list of {"type": "function", "function": {...}}')
    if len(value) > MAX_TOOLS:
        raise InvalidRequest(f"tools: {len(value)} tools exceeds the limit of {MAX_TOOLS}")
    seen: set[str] = set()
    for i, t in enumerate(value):
        if (
            not isinstance(t, dict)
            or t.get("type", "function") != "function"
            or not isinstance(t.get("function"), dict)
        ):
            raise InvalidRequest(f'tools[{i}]: must be {{"type": "function", "function": {{"name": ..., ...}}}}')
        fn = t["function"]
        name = fn.get("name")
        if not isinstance(name, str) or not name:
            raise InvalidRequest(f"tools[{i}].function.name: must be a non-empty string")
        if name in seen:
            raise InvalidRequest(f"tools[{i}].function.name: {name!r} is given twice")
        seen.add(name)
        if "parameters" in fn and fn["parameters"] is not None:
            _schema(f"tools[{i}].function.parameters", fn["parameters"])
        if fn.get("description") is not None and not isinstance(fn["description"], str):
            raise InvalidRequest(f"tools[{i}].function.description: must be a string")
        t["type"] = "function"
    return tuple(value)


def _tool_choice(raw: str) -> tuple[str, str | None]:
    if raw in TOOL_CHOICES:
        return raw, None
    value = _json("tool_choice", raw) if raw.lstrip().startswith(("{", '"')) else raw
    if isinstance(value, str) and value in TOOL_CHOICES:
        return value, None
    fn = value.get("function") if isinstance(value, dict) else None
    if isinstance(fn, dict) and isinstance(fn.get("name"), str) and fn["name"]:
        return "function", fn["name"]
    raise InvalidRequest(
        'tool_choice: must be "none", "auto", "required" or {"type": "function", "function": {"name": ...}}'
    )


def _constraint(f: Mapping[str, str]) -> tuple[str | None, Any, str]:
    """``(kind, value, field)`` of the one output constraint among the fields (kind None: none)."""
    found: list[tuple[str | None, Any, str]] = []
    if "response_format" in f:
        found.append(_response_format(f["response_format"]))
    if "guided_json" in f:
        found.append(("json_schema", _schema("guided_json", _json("guided_json", f["guided_json"])), "guided_json"))
    if "guided_regex" in f:
        if not f["guided_regex"]:
            raise InvalidRequest("guided_regex: must be a non-empty regular expression")
        found.append(("regex", f["guided_regex"], "guided_regex"))
    if "guided_choice" in f:
        choices = _json("guided_choice", f["guided_choice"])
        if not isinstance(choices, list) or not choices or not all(isinstance(c, str) and c for c in choices):
            raise InvalidRequest("guided_choice: must be a non-empty JSON list of non-empty strings")
        found.append(("choice", choices, "guided_choice"))
    if "guided_grammar" in f:
        if not f["guided_grammar"].strip():
            raise InvalidRequest("guided_grammar: must be a non-empty grammar (Lark or GBNF)")
        found.append(("grammar", f["guided_grammar"], "guided_grammar"))
    found = [x for x in found if x[0] is not None]
    if len(found) > 1:
        raise InvalidRequest(f"{', '.join(x[2] for x in found)}: give at most one output constraint")
    return found[0] if found else (None, None, "")


def parse_structured(f: Mapping[str, str], chat: bool) -> Structured | None:
    """The request's structured-output and tool fields (None when it has none); shapes only."""
    if not any(k in f for k in FIELDS):
        return None
    kind, value, field = _constraint(f)
    tools = _tools(f["tools"]) if "tools" in f else ()
    choice, function = _tool_choice(f["tool_choice"]) if "tool_choice" in f else ("auto", None)
    if tools and not chat:
        raise InvalidRequest("tools: only for chat requests (messages), not for prompt")
    if choice in ("required", "function") and not tools:
        raise InvalidRequest(f"tool_choice: {function or choice!r} needs tools")
    if function is not None and function not in {t["function"]["name"] for t in tools}:
        raise InvalidRequest(f"tool_choice: function {function!r} is not among the tools")
    out = Structured(kind, value, field, tools, choice, function)
    if out.calls_tools and kind is not None:
        raise InvalidRequest(f"tool_choice, {field}: a required tool call cannot also follow {field}")
    return out


# ---- compiling ---------------------------------------------------------------------------------------------


def grammar_text(s: Structured, fmt: str | None) -> tuple[str | None, str]:
    """``(the llguidance grammar, the field it stands for)``; (None, "") when the output is free."""
    import llguidance
    from llguidance.gbnf_to_lark import any_to_lark

    if s.calls_tools:
        if fmt is None:
            raise InvalidRequest("tools: this model's chat template has no tool-call format")
        names = [s.function] if s.function else [t["function"]["name"] for t in s.tools]
        return call_grammar(list(s.tools), names, fmt, single=s.function is not None), "tools"
    if s.kind in ("json_object", "json_schema"):
        return llguidance.LLMatcher.grammar_from_json_schema(s.value), s.field
    if s.kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(s.value), s.field
    if s.kind == "choice":
        return "start: " + " | ".join(json.dumps(c, ensure_ascii=False) for c in s.value), s.field
    if s.kind == "grammar":
        try:
            return any_to_lark(s.value), s.field
        except Exception as e:  # noqa: BLE001 - the converter raises several types for bad GBNF
            raise InvalidRequest(f"guided_grammar: not a valid Lark or GBNF grammar: {e}") from e
    return None, ""


class GrammarCompiler:
    """Builds and checks request grammars against the model's tokenizer; thread-safe, results cached by the
    grammar's hash (a repeated schema costs a dictionary lookup)."""

    def __init__(self, tokenizer: Any, vocab_size: int | None = None) -> None:
        self._tokenizer = tokenizer
        self._vocab_size = vocab_size
        self._llt: Any = None
        self._lock = threading.Lock()
        self._cache: OrderedDict[str, str | None] = OrderedDict()  # hash -> None (ok) or the error

    def _ll_tokenizer(self) -> Any:
        with self._lock:
            if self._llt is None:
                import llguidance.hf

                self._llt = llguidance.hf.from_tokenizer(self._tokenizer, n_vocab=self._vocab_size)
            return self._llt

    def compile(self, s: Structured, fmt: str | None) -> str | None:
        """The grammar for ``s`` (None: unconstrained); InvalidRequest naming the field and the construct the
        engine cannot enforce."""
        grammar, field = grammar_text(s, fmt)
        if grammar is None:
            return None
        key = hashlib.sha256(grammar.encode("utf-8")).hexdigest()
        with self._lock:
            hit = key in self._cache
            error = self._cache.get(key)
            if hit:
                self._cache.move_to_end(key)
        if not hit:
            error = self._check(grammar)
            with self._lock:
                self._cache[key] = error
                while len(self._cache) > COMPILED_CACHE:
                    self._cache.popitem(last=False)
        if error is not None:
            raise InvalidRequest(f"{field}: the grammar engine cannot enforce it: {error}")
        return grammar

    def _check(self, grammar: str) -> str | None:
        import llguidance

        llt = self._ll_tokenizer()
        try:
            is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, llt)
        except (ValueError, RuntimeError) as e:
            return str(e)[:500]
        if is_error or messages:  # a warning is a construct it would ignore: the output could break it
            return "; ".join(m.strip() for m in messages)[:500] or "invalid grammar"
        return None
