"""Tools through templates that support them (a Qwen-style and a Llama-3-style template), and
the forced-call grammar in each template's style on the embedded model."""

from __future__ import annotations

import json

import pytest

from radixserve.model.tokenizer import Tokenizer
from radixserve.sampling import SamplingParams
from radixserve.server.prompting import ChatTurn, render
from radixserve.server.tools import ToolChoice, ToolSpec, call_style, parse_tool_calls, tool_call_grammar
from tests.conftest import run_to_completion

# The shape of Qwen2.5's template: tools after the system text, calls in <tool_call> tags.
QWEN_LIKE = (
    "{%- if tools %}<|im_start|>system\n{{ messages[0]['content'] if messages[0]['role'] == 'system' else '' }}"
    "\n\n# Tools\n<tools>{% for tool in tools %}\n{{ tool | tojson }}{% endfor %}\n</tools><|im_end|>\n{%- endif %}"
    "{%- for message in messages %}{%- if message.role == 'system' and tools %}{%- elif message.role == 'tool' %}"
    "<|im_start|>user\n<tool_response>\n{{ message.content }}\n</tool_response><|im_end|>\n"
    "{%- elif message.tool_calls %}<|im_start|>assistant\n{{ message.content }}{%- for c in message.tool_calls %}"
    "\n<tool_call>\n{\"name\": \"{{ c.function.name }}\", \"arguments\": {{ c.function.arguments | tojson }}}"
    "\n</tool_call>{%- endfor %}<|im_end|>\n"
    "{%- else %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}"
)
# Llama 3.1's way: tools as JSON in the user turn, calls as bare JSON with "parameters".
LLAMA3_LIKE = (
    "{%- for message in messages %}<|start_header_id|>{{ message.role }}<|end_header_id|>\n\n"
    "{%- if tools and loop.last %}{% for t in tools %}{{ t | tojson }}\n{% endfor %}{% endif %}"
    "{%- if message.tool_calls %}{% for c in message.tool_calls %}{\"name\": \"{{ c.function.name }}\", "
    "\"parameters\": {{ c.function.arguments | tojson }}}{% endfor %}{% else %}{{ message.content }}{% endif %}"
    "<|eot_id|>{%- endfor %}{%- if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{%- endif %}"
)
TOOL = ToolSpec("get_time", "The time in a city.", {"type": "object", "properties": {"city": {"type": "string",
                "maxLength": 16}}, "required": ["city"], "additionalProperties": False})


@pytest.fixture(scope="module")
def base(embedded_model):
    return embedded_model.tokenizer


def with_template(base, template):
    return Tokenizer(base.backend, chat_template=template, eos_token="<|im_end|>")


def test_native_template_gets_tools_calls_and_results(base):
    tok = with_template(base, QWEN_LIKE)
    assert call_style(tok) == "hermes"
    turns = [ChatTurn("system", ["Be useful."]), ChatTurn("user", ["Time in Oslo?"]),
             ChatTurn("assistant", [], [{"id": "c1", "name": "get_time", "arguments": {"city": "Oslo"}}]),
             ChatTurn("tool", ["12:00"], tool_call_id="c1", name="get_time")]
    text = render(tok, turns, tools=[TOOL])
    assert '"name": "get_time", "description": "The time in a city."' in text
    assert '<tool_call>\n{"name": "get_time", "arguments": {"city": "Oslo"}}\n</tool_call>' in text
    assert "<tool_response>\n12:00\n</tool_response>" in text
    assert text.index("Be useful.") < text.index("<tools>")  # this template's order, not ours


def test_llama3_style_template_and_its_forced_grammar(base, make_engine):
    tok = with_template(base, LLAMA3_LIKE)
    assert call_style(tok) == "llama3_json"
    text = render(tok, [ChatTurn("user", ["What time is it in Rome?"])], tools=[TOOL])
    assert '"name": "get_time"' in text
    engine = make_engine()
    spec = tool_call_grammar([TOOL], ToolChoice("named", "get_time", parallel=False), "llama3_json")
    engine.add_request(base.encode(text), SamplingParams(max_tokens=40, temperature=0, guided=spec), request_id="c")
    out = run_to_completion(engine)["c"]
    assert out.finish_reason == "stop", out.text
    content, calls = parse_tool_calls(out.text, {"get_time"})
    assert content is None and calls[0].name == "get_time"
    assert set(json.loads(calls[0].arguments)) == {"city"}
