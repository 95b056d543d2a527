"""Tool calling, shared by the OpenAI and Anthropic routes: tool definitions, how they reach the
prompt, how calls are parsed out of the output, and the grammar that forces a call.

Rendering. A chat template that knows about tools (it mentions `tools`: Qwen2/2.5/3, Hermes,
Llama 3.1+) gets them as the `tools` variable and the conversation's calls and results as
`tool_calls` / role "tool" messages, exactly as transformers passes them. A template that does
not (the embedded SmolLM2's, and the ChatML default) gets the Hermes/Qwen convention written
into the conversation instead: the tool list opens the system message (tools first, then the
system text: Anthropic's cache order, so tools sit in the cached prefix), an assistant's calls
become `<tool_call>{...}</tool_call>` lines and a tool result becomes a user turn wrapped in
`<tool_response>`.

Parsing. Two styles are recognised in every output: Hermes/Qwen `<tool_call>{"name": ...,
"arguments": {...}}</tool_call>` (any number) and Llama 3's bare JSON `{"name": ...,
"parameters": {...}}` (optionally after `<|python_tag|>`, several joined by `;`). A call naming a
tool that was not offered is left as text.

Forcing. tool_choice "required" (Anthropic "any") or a named tool constrains decoding with a
grammar (radixserve.structured): the output must be one or more calls in the template's style
whose arguments match the tool's parameter schema, so even a 135M model emits calls that parse.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from radixserve.errors import InvalidRequestError
from radixserve.server.errors import APIError
from radixserve.structured import GuidedSpec, check_grammar

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
PYTHON_TAG = "<|python_tag|>"


@dataclass(slots=True)
class ToolSpec:
    """One callable function: its name, description and JSON-schema parameters."""

    name: str
    description: str
    parameters: dict[str, Any]

    def openai_dict(self) -> dict[str, Any]:
        function: dict[str, Any] = {"name": self.name}
        if self.description:
            function["description"] = self.description
        function["parameters"] = self.parameters
        return {"type": "function", "function": function}


@dataclass(slots=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text, as OpenAI sends it

    def openai_dict(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}

    def input(self) -> Any:
        try:
            return json.loads(self.arguments)
        except ValueError:
            return {}


@dataclass(slots=True)
class ToolChoice:
    """mode: "none" (no calls parsed), "auto", "required" (at least one call), "named" (a call
    of `name`); parallel: several calls allowed."""

    mode: str = "auto"
    name: str | None = None
    parallel: bool = True

    @property
    def forced(self) -> bool:
        return self.mode in ("required", "named")


def new_call_id(prefix: str = "call_") -> str:
    return f"{prefix}{uuid.uuid4().hex[:24]}"


# ---- validation -------------------------------------------------------------------------------
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def check_parameters_schema(schema: Any, param: str) -> dict[str, Any]:
    """A tool's parameters must be a JSON schema for an object; returns it (default: no arguments)."""
    if schema is None:
        return {"type": "object", "properties": {}}
    if not isinstance(schema, dict):
        raise APIError(400, f"{param}: must be a JSON schema object, got {type(schema).__name__}", param=param)
    if schema.get("type", "object") != "object":
        raise APIError(400, f"{param}: must be a JSON schema of type 'object', got type {schema.get('type')!r}",
                       param=param)
    check_json_schema(schema, param)
    return schema


def check_json_schema(schema: Any, param: str) -> None:
    """400 naming `param` unless `schema` is a valid JSON schema that the grammar engine takes."""
    import jsonschema

    if not isinstance(schema, (dict, bool)):
        raise APIError(400, f"{param}: a JSON schema must be an object, got {type(schema).__name__}", param=param)
    try:
        jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator).check_schema(schema)
    except jsonschema.SchemaError as e:
        where = "/".join(str(p) for p in e.absolute_path)
        raise APIError(400, f"{param}: invalid JSON schema{' at ' + where if where else ''}: {e.message}",
                       param=param) from None
    try:
        check_grammar(GuidedSpec("json_schema", schema))
    except InvalidRequestError as e:
        raise APIError(400, f"{param}: {e}", param=param) from None


def check_tool_name(name: Any, param: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise APIError(400, f"{param}: a tool name must match ^[A-Za-z0-9_.-]{{1,64}}$, got {name!r}", param=param)
    return name


def check_unique(tools: list[ToolSpec], param: str) -> None:
    seen = set()
    for tool in tools:
        if tool.name in seen:
            raise APIError(400, f"{param}: tool names must be unique; {tool.name!r} appears twice", param=param)
        seen.add(tool.name)


# ---- rendering --------------------------------------------------------------------------------
def template_supports_tools(tokenizer: Any) -> bool:
    return "tools" in (tokenizer.chat_template or "")


def call_style(tokenizer: Any) -> str:
    """"hermes" (<tool_call> tags: Qwen, Hermes, and our fallback) or "llama3_json"."""
    template = tokenizer.chat_template or ""
    if template_supports_tools(tokenizer) and TOOL_CALL_OPEN not in template:
        return "llama3_json"
    return "hermes"


def tools_system_text(tools: list[ToolSpec]) -> str:
    """The fallback's tool list, in the words Qwen2.5's template uses."""
    listing = "\n".join(json.dumps(t.openai_dict(), ensure_ascii=False) for t in tools)
    return (
        "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n"
        f"<tools>\n{listing}\n</tools>\n\n"
        "For each function call, return a json object with function name and arguments within "
        "<tool_call></tool_call> XML tags:\n"
        '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
    )


def hermes_call_text(name: str, arguments: Any) -> str:
    body = json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)
    return f"{TOOL_CALL_OPEN}\n{body}\n{TOOL_CALL_CLOSE}"


# ---- parsing ----------------------------------------------------------------------------------
_HERMES = re.compile(re.escape(TOOL_CALL_OPEN) + r"\s*(.*?)\s*(?:" + re.escape(TOOL_CALL_CLOSE) + r"|$)", re.DOTALL)


def parse_tool_calls(text: str, tool_names: set[str]) -> tuple[str | None, list[ToolCall]]:
    """(content before the calls or None, calls). No recognisable call: (text, [])."""
    start = text.find(TOOL_CALL_OPEN)
    if start >= 0:
        calls = []
        for body in _HERMES.findall(text[start:]):
            call = _call_from_json(body, tool_names)
            if call is not None:
                calls.append(call)
        if calls:
            content = text[:start].strip()
            return content or None, calls
        return text, []
    stripped = text.strip()
    if stripped.startswith(PYTHON_TAG):
        stripped = stripped[len(PYTHON_TAG):].strip()
    if stripped.startswith("{"):
        calls = []
        for body in _split_json_objects(stripped):
            call = _call_from_json(body, tool_names)
            if call is None:
                return text, []
            calls.append(call)
        if calls:
            return None, calls
    return text, []


def _split_json_objects(text: str) -> list[str]:
    """`{...}; {...}` or `{...}\n{...}` -> the objects' texts (raw_decode walks them)."""
    decoder = json.JSONDecoder()
    out, i = [], 0
    while i < len(text):
        try:
            _, end = decoder.raw_decode(text, i)
        except ValueError:
            return [text]
        out.append(text[i:end])
        i = end
        while i < len(text) and text[i] in " \t\r\n;":
            i += 1
    return out


def _call_from_json(body: str, tool_names: set[str]) -> ToolCall | None:
    try:
        data = json.loads(body)
    except ValueError:
        return None
    if not isinstance(data, dict) or data.get("name") not in tool_names:
        return None
    args = data.get("arguments", data.get("parameters", {}))
    if isinstance(args, str):  # some models double-encode
        try:
            args = json.loads(args)
        except ValueError:
            return None
    # the model's own argument text where it is the object itself: exactly what streaming sent
    raw = _CallBodyScanner().scan(body).arguments
    if not raw or not isinstance(args, dict) or _loads_or_none(raw) != args:
        raw = json.dumps(args, ensure_ascii=False)
    return ToolCall(new_call_id(), data["name"], raw)


def _loads_or_none(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


class _CallBodyScanner:
    """Reads one call's JSON (`{"name": ..., "arguments": {...}}`) as it arrives, character by
    character: the name once its string closes, then the arguments object's text as it grows.

    Only that plain shape streams (name first, arguments an object); anything else (arguments
    first, double-encoded arguments, other keys) stops the scan and waits for the final parse.
    The argument text is the model's own, so the streamed pieces concatenate to exactly the
    `arguments` that parsing the whole output gives."""

    __slots__ = ("state", "key", "buf", "escape", "in_string", "depth", "name", "arguments")

    def __init__(self) -> None:
        self.state = "start"  # start | key_or_end | key | colon | value | name | arguments | stopped
        self.key: str | None = None
        self.buf: list[str] = []  # the string being read (a key or the name), raw
        self.escape = False
        self.in_string = False
        self.depth = 0
        self.name: str | None = None
        self.arguments = ""  # the arguments' text so far

    def scan(self, text: str) -> _CallBodyScanner:
        self.feed(text)
        return self

    def feed(self, text: str) -> str:
        """Read more of the call; returns the argument text it added."""
        added: list[str] = []
        for c in text:
            state = self.state
            if state == "stopped":
                break
            if state == "arguments":
                added.append(c)
                if self.in_string:
                    if self.escape:
                        self.escape = False
                    elif c == "\\":
                        self.escape = True
                    elif c == '"':
                        self.in_string = False
                elif c == '"':
                    self.in_string = True
                elif c in "{[":
                    self.depth += 1
                elif c in "}]":
                    self.depth -= 1
                    if self.depth == 0:
                        self.state = "key_or_end"
            elif state in ("key", "name"):
                if self.escape:
                    self.escape = False
                elif c == "\\":
                    self.escape = True
                elif c == '"':
                    value = _loads_or_none('"' + "".join(self.buf) + '"')
                    self.buf = []
                    if not isinstance(value, str):
                        self.state = "stopped"
                    elif state == "key":
                        self.key, self.state = value, "colon"
                    else:
                        self.name, self.state = value, "key_or_end"
                    continue
                self.buf.append(c)
            elif c in " \t\r\n":
                continue
            elif state == "start":
                self.state = "key_or_end" if c == "{" else "stopped"
            elif state == "key_or_end":
                if c == '"':
                    self.state = "key"
                elif c == "}":
                    self.state = "stopped"  # the call is complete
                elif c != ",":
                    self.state = "stopped"
            elif state == "colon":
                self.state = "value" if c == ":" else "stopped"
            elif state == "value":
                if self.key == "name" and c == '"' and self.name is None:
                    self.state = "name"
                elif self.key in ("arguments", "parameters") and c == "{" and self.name is not None \
                        and not self.arguments:
                    self.state, self.depth = "arguments", 1
                    added.append(c)
                else:
                    self.state = "stopped"
        piece = "".join(added)
        self.arguments += piece
        return piece


@dataclass(slots=True)
class TextDelta:
    """Content text (outside any call)."""

    text: str


@dataclass(slots=True)
class CallStart:
    """A call begins: its index among the output's calls, id and name (arguments follow)."""

    index: int
    id: str
    name: str


@dataclass(slots=True)
class ArgumentsDelta:
    """The next piece of call `index`'s arguments JSON text."""

    index: int
    text: str


StreamEvent = TextDelta | CallStart | ArgumentsDelta


class ToolCallStreamer:
    """Turns streamed output text into content and tool-call events as it arrives.

    Content streams while it cannot be a call. A Hermes `<tool_call>` streams as the model
    writes it: a CallStart once the name is complete (and is one of `tool_names`), then the
    arguments' text in ArgumentsDelta pieces. At the end the whole output is parsed exactly as
    parse_tool_calls does; what the stream has not sent yet (a call in another shape, a Llama 3
    JSON call, which is only known to be a call once the output ends) follows then. A call cut
    off mid-arguments (max_tokens) has sent what it had, and is not in `finish`'s calls."""

    def __init__(self, tool_names: set[str]) -> None:
        self.tool_names = tool_names
        self.text = ""
        self.emitted = 0  # content sent so far: self.text[:emitted]
        self.holding = False  # a call may have started: no more content until the end
        self.first_call = -1  # where the first <tool_call> starts (-1: none)
        self.scanners: list[_CallBodyScanner] = []  # one per <tool_call> seen, in order
        self.body_start = 0  # where the body of the last <tool_call> starts in self.text
        self.body_end = -1  # where that body ends (its </tool_call>), -1 while open
        self.started: dict[int, tuple[int, str]] = {}  # call number -> (index, id), streamed calls
        self._scanned = 0  # characters of the open body fed to its scanner

    def feed(self, new_text: str) -> list[StreamEvent]:
        """Add output text; returns what can be sent now."""
        self.text += new_text
        events: list[StreamEvent] = []
        if not self.holding:
            content = self._content()
            if content:
                events.append(TextDelta(content))
        if self.first_call >= 0:
            events += self._scan_calls()
        return events

    def _content(self) -> str:
        head = self.text.lstrip()
        if not head:
            return ""
        if head.startswith("{") or head.startswith(PYTHON_TAG):
            self.holding = True  # Llama 3 style: the whole output is a call (decided at the end)
            return ""
        if self.emitted == 0 and PYTHON_TAG.startswith(head):
            return ""  # may still become <|python_tag|>
        start = self.text.find(TOOL_CALL_OPEN, self.emitted)
        if start >= 0:
            self.holding, self.first_call = True, start
            self.scanners.append(_CallBodyScanner())
            self.body_start = start + len(TOOL_CALL_OPEN)
            out, self.emitted = self.text[self.emitted:start], start
            return out
        end = len(self.text)  # hold back a possible start of "<tool_call>"
        for k in range(min(len(TOOL_CALL_OPEN) - 1, len(self.text)), 0, -1):
            if self.text.endswith(TOOL_CALL_OPEN[:k]):
                end -= k
                break
        out, self.emitted = self.text[self.emitted:end], max(self.emitted, end)
        return out

    def _scan_calls(self) -> list[StreamEvent]:
        """Feed the open call's scanner what arrived; move on to the next <tool_call> once it closes."""
        events: list[StreamEvent] = []
        text = self.text
        while True:
            if self.body_end < 0:
                scanner, number = self.scanners[-1], len(self.scanners) - 1
                close = text.find(TOOL_CALL_CLOSE, self.body_start)
                end = close if close >= 0 else len(text)
                scanned = self.body_start + self._scanned
                piece = scanner.feed(text[scanned:end])
                self._scanned = end - self.body_start
                if number not in self.started and scanner.name is not None and scanner.name in self.tool_names:
                    self.started[number] = (len(self.started), new_call_id())
                    events.append(CallStart(*self.started[number], scanner.name))
                    piece = scanner.arguments  # everything so far (the name may complete with them)
                if piece and number in self.started:
                    events.append(ArgumentsDelta(self.started[number][0], piece))
                if close < 0:
                    return events
                self.body_end = close + len(TOOL_CALL_CLOSE)
            following = text.find(TOOL_CALL_OPEN, self.body_end)
            if following < 0:
                return events
            self.scanners.append(_CallBodyScanner())
            self.body_start, self.body_end, self._scanned = following + len(TOOL_CALL_OPEN), -1, 0

    def finish(self) -> tuple[list[StreamEvent], list[ToolCall]]:
        """At the end: (the events still to send, the output's calls, as parse_tool_calls finds them)."""
        content, parsed = parse_tool_calls(self.text, self.tool_names)
        if self.first_call < 0:
            if parsed:  # Llama 3 JSON: a call only now that the output is complete
                return [e for i, c in enumerate(parsed) for e in (CallStart(i, c.id, c.name),
                                                                  ArgumentsDelta(i, c.arguments))], parsed
            rest = self.text[self.emitted:]
            return ([TextDelta(rest)] if rest else []), []
        if not parsed and not self.started:  # no call after all: it was all content
            rest = self.text[self.emitted:]
            return ([TextDelta(rest)] if rest else []), []
        events: list[StreamEvent] = []
        rest = self.text[self.emitted:self.first_call].rstrip()
        if rest and not self.started:
            events.append(TextDelta(rest))
        bodies = _HERMES.findall(self.text[self.first_call:])
        calls, next_index = [], len(self.started)
        for number, body in enumerate(bodies):
            call = _call_from_json(body, self.tool_names)
            if call is None:
                continue
            if number in self.started:
                index, call.id = self.started[number]
                sent = self.scanners[number].arguments
                if call.arguments.startswith(sent) and len(call.arguments) > len(sent):
                    events.append(ArgumentsDelta(index, call.arguments[len(sent):]))
            else:
                index, next_index = next_index, next_index + 1
                events += [CallStart(index, call.id, call.name), ArgumentsDelta(index, call.arguments)]
            calls.append(call)
        return events, calls


# ---- forcing a call ---------------------------------------------------------------------------
def tool_call_grammar(tools: list[ToolSpec], choice: ToolChoice, style: str) -> GuidedSpec:
    """A grammar whose sentences are calls (of `choice.name`, or of any tool) in `style`."""
    offered = [t for t in tools if choice.mode != "named" or t.name == choice.name]
    key = "parameters" if style == "llama3_json" else "arguments"
    options = [
        {
            "type": "object",
            "properties": {"name": {"const": t.name}, key: t.parameters},
            "required": ["name", key],
            "additionalProperties": False,
        }
        for t in offered
    ]
    schema: dict[str, Any] = options[0] if len(options) == 1 else {"anyOf": options}
    schema = {**schema, "x-guidance": {"whitespace_flexible": False}}
    body = "%json " + json.dumps(schema, ensure_ascii=False)
    if style == "llama3_json":
        call = body
        sep = '"; "'
    else:
        call = f'"{TOOL_CALL_OPEN}\\n" {body} "\\n{TOOL_CALL_CLOSE}"'
        sep = '"\\n"'
    rule = f"start: call ({sep} call)*\n" if choice.parallel else "start: call\n"
    return GuidedSpec("lark", rule + f"call: {call}\n")
