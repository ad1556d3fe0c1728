"""OpenAI tool calling on ``/v1/chat/completions``, as vLLM and SGLang serve it.

The request's ``tools`` go to the chat template (``tools=``, as transformers templates take them). What the
model then writes becomes ``message.tool_calls`` according to ``tool_choice``:

- a named function (``{"type": "function", "function": {"name": ...}}``): the output is constrained to that
  function's ``parameters`` JSON schema (the engine's ``json_schema``) and is the call's ``arguments``;
- ``"required"``: the output is constrained to a JSON array of at least one ``{"name", "parameters"}``
  object, one of the tools each (a single one with ``parallel_tool_calls: false``), as vLLM does;
- ``"auto"`` (OpenAI's default with tools): the model writes freely and the server's ``--tool-call-parser``
  reads calls out of its text: ``hermes`` (``<tool_call>{"name": ..., "arguments": ...}</tool_call>`` blocks:
  Qwen2.5/3, Hermes), ``llama3_json`` (the whole reply one JSON object ``{"name", "parameters"}``, or several
  separated by ``;``: Llama 3.1+), ``pythonic`` (the whole reply a Python list of calls, ``[f(a=1)]``: Llama
  3.2 and 4) or ``mistral`` (text, then the ``[TOOL_CALLS]`` control token and a JSON list of calls, or
  ``name[ARGS]{...}`` per call in newer tokenizers; replies under it are decoded with special tokens). Without
  a parser ``"auto"`` is a 400, as in vLLM;
- ``"none"``: the tools reach the template, nothing is parsed.

``finish_reason`` is "tool_calls" when the reply holds calls (OpenAI gives "stop" for a named function, and so
does this server). Streams send a named function's arguments as they come; other replies' text until a call
may begin, then the calls in one delta at the end ("required" replies send no text). A JSON schema's ``x-guidance``
options (``whitespace_flexible``, ...) in a tool's ``parameters`` apply to the whole constrained reply.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import re
import uuid
from typing import Any

from jaxrt.server.protocol import APIError

TOOL_CALL_PARSERS = ("hermes", "llama3_json", "pythonic", "mistral")
# The parsers whose calls are the whole reply, by the character a call starts with.
_WHOLE_REPLY_START = {"llama3_json": "{", "pythonic": "["}
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_HERMES_OPEN = "<tool_call>"
_HERMES_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)
# Mistral's calls follow its [TOOL_CALLS] control token: a JSON list of calls (v3 tokenizers), or ``name[ARGS]{...}``
# per call (v11+). The token is special, so replies under this parser keep special tokens in their text.
_MISTRAL_OPEN = "[TOOL_CALLS]"
_MISTRAL_ARGS = "[ARGS]"
_OPEN = {"hermes": _HERMES_OPEN, "mistral": _MISTRAL_OPEN}  # parsers whose calls follow a marker in the text
_EMPTY_PARAMETERS = {"type": "object", "properties": {}}


@dataclasses.dataclass(frozen=True)
class ToolPlan:
    """How a chat request's reply becomes tool calls (``plan``)."""

    choice: str  # "auto" | "required" | "named"
    parameters: dict[str, dict[str, Any]]  # each tool's parameters schema, by name
    named: str | None = None  # the function of a named tool_choice
    parser: str | None = None  # "auto": the server's --tool-call-parser
    parallel: bool = True  # parallel_tool_calls

    def schema(self) -> str | None:
        """The JSON schema the reply is constrained to (named, required), or None (auto)."""
        if self.choice == "named":
            return json.dumps(self.parameters[self.named])
        if self.choice != "required":
            return None
        items = [
            {
                "type": "object",
                "properties": {"name": {"const": name}, "parameters": params},
                "required": ["name", "parameters"],
                "additionalProperties": False,
            }
            for name, params in self.parameters.items()
        ]
        schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": items}}
        if not self.parallel:
            schema["maxItems"] = 1
        options = {}
        for params in self.parameters.values():
            options.update(params.get("x-guidance", {}))
        if options:
            schema["x-guidance"] = options
        return json.dumps(schema)

    def parse(self, text: str) -> tuple[str | None, list[dict[str, str]]]:
        """(content, calls): the reply's text outside tool calls (None when there is none) and its calls as
        ``{"name", "arguments"}`` (arguments a JSON string). A reply that does not parse (cut short by
        ``max_tokens``, say) is all content, with no calls."""
        if self.choice == "named":
            return None, [{"name": self.named, "arguments": text}]
        if self.choice == "required":
            calls = _calls(_json(text))
            return (None, calls) if calls else (text, [])
        return _PARSE[self.parser](text)

    @property
    def keeps_special_tokens(self) -> bool:
        """Whether the reply must be decoded with its special tokens (the parser reads a control token)."""
        return self.choice == "auto" and self.parser == "mistral"


def plan(body: Any, parser: str | None) -> ToolPlan | None:
    """The request's tool plan (None: no tool calls to parse), after checking ``tools`` and ``tool_choice``;
    400s name the field."""
    choice = body.tool_choice
    if not body.tools:
        if choice not in (None, "none"):
            raise APIError(400, "tool_choice needs tools", param="tool_choice")
        return None
    parameters: dict[str, dict[str, Any]] = {}
    for k, tool in enumerate(body.tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if (
            not isinstance(tool, dict)
            or tool.get("type", "function") != "function"
            or not isinstance(fn, dict)
        ):
            raise APIError(
                400, f"tools[{k}] must be {{'type': 'function', 'function': {{...}}}}", param="tools"
            )
        name = fn.get("name")
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise APIError(400, f"tools[{k}].function.name must match [A-Za-z0-9_-]{{1,64}}", param="tools")
        if name in parameters:
            raise APIError(400, f"tools: function {name!r} given twice", param="tools")
        params = fn.get("parameters", _EMPTY_PARAMETERS)
        if not isinstance(params, dict):
            raise APIError(400, f"tools[{k}].function.parameters must be a JSON schema object", param="tools")
        parameters[name] = params
    parallel = body.parallel_tool_calls is not False
    if choice is None or choice == "auto":
        if parser is None:
            raise APIError(
                400,
                '"auto" tool choice needs the server started with --tool-call-parser '
                f'({", ".join(TOOL_CALL_PARSERS)}); or pass tool_choice "required", "none" or a function',
                param="tool_choice",
            )
        return ToolPlan("auto", parameters, parser=parser, parallel=parallel)
    if choice == "none":
        return None
    if choice == "required":
        return ToolPlan("required", parameters, parallel=parallel)
    fn = choice.get("function") if isinstance(choice, dict) else None
    name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(name, str) or choice.get("type", "function") != "function":
        raise APIError(
            400,
            'tool_choice must be "none", "auto", "required" or {"type": "function", "function": {"name": ...}}',
            param="tool_choice",
        )
    if name not in parameters:
        raise APIError(400, f"tool_choice names {name!r}, which is not among the tools", param="tool_choice")
    return ToolPlan("named", parameters, named=name, parallel=parallel)


def template_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages for the chat template: an assistant message's ``tool_calls[].function.arguments``, a JSON string
    in OpenAI's format, as the mapping templates render (vLLM does the same)."""
    for m in messages:
        for call in m.get("tool_calls") or []:
            fn = call.get("function") if isinstance(call, dict) else None
            if isinstance(fn, dict) and isinstance(fn.get("arguments"), str):
                try:
                    fn["arguments"] = json.loads(fn["arguments"])
                except ValueError:
                    pass
    return messages


def tool_call_objects(calls: list[dict[str, str]]) -> list[dict[str, Any]]:
    """OpenAI's ``message.tool_calls`` entries for parsed calls."""
    return [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": dict(c)} for c in calls]


class ToolStream:
    """One streamed choice's reply under a tool plan. ``feed`` a new piece of the reply; get the text to send now
    as content and the ``delta.tool_calls`` entries to send with it. ``finish`` at the end gives the rest of
    both and whether the reply made calls.

    A named function's reply is its call's arguments, so they stream as they come (the first entry carries the
    call's id and name, as OpenAI's do). Other plans send text until a call may begin (a possible marker's
    start is held back), then their calls, complete, at the end."""

    def __init__(self, tools: ToolPlan) -> None:
        self.tools = tools
        self.text = ""
        self.sent = 0  # characters of text sent as content
        self.held = tools.choice != "auto"  # from here on nothing is sent as content: a call may have begun
        self.header: dict[str, Any] | None = None  # a named call's first entry, once sent

    def feed(self, delta: str) -> tuple[str, list[dict[str, Any]]]:
        self.text += delta
        if self.tools.choice == "named":
            return "", self._named(delta) if delta else []
        if self.held:
            return "", []
        start = self._call_start()
        if start is not None:
            self.held = True
            out, self.sent = self.text[self.sent : start], start
            return out, []
        # Keep back a tail that could be the beginning of a call's marker.
        end = len(self.text) - _marker_overlap(self.text, self._marker())
        out, self.sent = self.text[self.sent : end], max(self.sent, end)
        return out, []

    def finish(self) -> tuple[str, list[dict[str, Any]], bool]:
        if self.tools.choice == "named":
            return "", [] if self.header else self._named(""), True
        auto = self.tools.choice == "auto"
        content, calls = self.tools.parse(self.text[self.sent :] if auto else self.text)
        if not calls:
            return self.text[self.sent :], [], False
        entries = [{"index": j, **obj} for j, obj in enumerate(tool_call_objects(calls))]
        # "auto": what the parse leaves outside the calls, after the text already sent (hermes: text after or
        # between blocks).
        return (content or "") if auto else "", entries, True

    def _named(self, arguments: str) -> list[dict[str, Any]]:
        if self.header is None:
            (self.header,) = tool_call_objects([{"name": self.tools.named, "arguments": arguments}])
            return [{"index": 0, **self.header}]
        return [{"index": 0, "function": {"arguments": arguments}}]

    def _marker(self) -> str:
        return _OPEN.get(self.tools.parser) or _WHOLE_REPLY_START[self.tools.parser]

    def _call_start(self) -> int | None:
        if self.tools.parser in _OPEN:
            i = self.text.find(_OPEN[self.tools.parser])
            return None if i < 0 else i
        # llama3_json, pythonic: a reply that is calls starts with "{" / "[" (after whitespace).
        stripped = self.text.lstrip()
        if not stripped:
            return None
        return len(self.text) - len(stripped) if stripped[0] == self._marker() else None


def _marker_overlap(text: str, marker: str) -> int:
    """Length of the longest end of ``text`` that begins ``marker`` (0 if none)."""
    for n in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


def _calls(obj: Any) -> list[dict[str, str]]:
    """``[{"name", "arguments"}]`` from a parsed call or list of calls (each ``{"name", "arguments" or
    "parameters": ...}``); [] if any is not one."""
    items = obj if isinstance(obj, list) else [obj]
    calls = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            return []
        args = item.get("arguments", item.get("parameters", {}))  # hermes' name / llama3's and "required"'s
        calls.append({"name": item["name"], "arguments": args if isinstance(args, str) else json.dumps(args)})
    return calls


def _parse_hermes(text: str) -> tuple[str | None, list[dict[str, str]]]:
    calls, kept, pos = [], [], 0
    for m in _HERMES_BLOCK.finditer(text):
        found = _calls(_json(m.group(1)))
        if len(found) != 1:
            continue  # not a call: leave it in the content
        calls += found
        kept.append(text[pos : m.start()])
        pos = m.end()
    kept.append(text[pos:])
    content = "".join(kept).strip() if calls else text
    return (content or None), calls


def _parse_llama3_json(text: str) -> tuple[str | None, list[dict[str, str]]]:
    """The whole reply one JSON call or several separated by ";" (any other reply is content)."""
    decoder, calls, pos = json.JSONDecoder(), [], 0
    while True:
        while pos < len(text) and (text[pos].isspace() or (calls and text[pos] == ";")):
            pos += 1
        if pos == len(text):
            break
        try:
            obj, pos = decoder.raw_decode(text, pos)
        except ValueError:
            return (text or None), []
        found = _calls(obj)
        if len(found) != 1:
            return (text or None), []
        calls += found
    return (None, calls) if calls else ((text or None), [])


def _parse_pythonic(text: str) -> tuple[str | None, list[dict[str, str]]]:
    """The whole reply a Python list of calls with literal keyword arguments, ``[f(a=1), g(b="x")]`` (Llama 3.2
    and 4's pythonic format); any other reply is content."""
    try:
        tree = ast.parse(text.strip(), mode="eval").body
        if not isinstance(tree, ast.List) or not tree.elts:
            raise ValueError
        calls = []
        for call in tree.elts:
            if not isinstance(call, ast.Call) or not isinstance(call.func, ast.Name) or call.args:
                raise ValueError
            args = {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords if kw.arg is not None}
            if len(args) != len(call.keywords):  # a **mapping
                raise ValueError
            calls.append({"name": call.func.id, "arguments": json.dumps(args)})
    except (SyntaxError, ValueError, TypeError):
        return (text or None), []
    return None, calls


def _parse_mistral(text: str) -> tuple[str | None, list[dict[str, str]]]:
    """Text, then ``[TOOL_CALLS]`` and the calls: a JSON list (or one object) of ``{"name", "arguments"}``, or
    ``name[ARGS]{...}`` after each ``[TOOL_CALLS]``. Calls that do not parse leave the reply all content."""
    i = text.find(_MISTRAL_OPEN)
    if i < 0:
        return (text or None), []
    calls = []
    for part in text[i:].split(_MISTRAL_OPEN)[1:]:
        name, sep, args = (x.strip() for x in part.partition(_MISTRAL_ARGS))
        if sep:
            obj = _json(args)
            ok = _NAME.fullmatch(name) is not None and isinstance(obj, dict)
            found = _calls({"name": name, "arguments": obj}) if ok else []
        else:
            found = _calls(_json(part.strip()))
        if not found:
            return (text or None), []
        calls += found
    return (text[:i].strip() or None), calls


# --tool-call-parser -> the function that reads a reply's calls (ToolPlan.parse).
_PARSE = {
    "hermes": _parse_hermes,
    "llama3_json": _parse_llama3_json,
    "pythonic": _parse_pythonic,
    "mistral": _parse_mistral,
}
