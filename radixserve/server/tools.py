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
    return ToolCall(new_call_id(), data["name"], json.dumps(args, ensure_ascii=False))


class ToolCallStreamer:
    """Streams content while it cannot be a tool call, then holds the rest back so that the
    calls are sent whole (as tool_calls / tool_use blocks) when the output ends."""

    def __init__(self) -> None:
        self.text = ""
        self.emitted = 0
        self.holding = False

    def feed(self, new_text: str) -> str:
        """Add output text; returns the content that can be sent now."""
        self.text += new_text
        if self.holding:
            return ""
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
            self.holding = True
            out, self.emitted = self.text[self.emitted:start], start
            return out
        end = len(self.text)  # hold back a possible start of "<tool_call>"
        for k in range(min(len(TOOL_CALL_OPEN) - 1, len(self.text)), 0, -1):
            if self.text.endswith(TOOL_CALL_OPEN[:k]):
                end -= k
                break
        out, self.emitted = self.text[self.emitted:end], max(self.emitted, end)
        return out

    def finish(self, tool_names: set[str]) -> tuple[str, list[ToolCall]]:
        """At the end: (content still to send, calls)."""
        _, calls = parse_tool_calls(self.text, tool_names)
        if calls:
            start = self.text.find(TOOL_CALL_OPEN)
            before = self.text[:start] if start >= 0 else ""
            return before[self.emitted:].rstrip(), calls
        return self.text[self.emitted:], []


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
