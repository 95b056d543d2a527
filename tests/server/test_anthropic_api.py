"""Anthropic Messages API through the official anthropic client: messages, streaming, cache control."""

from __future__ import annotations

import time
import uuid

import anthropic
import pytest

from radixserve.server import ServerConfig
from tests.server.conftest import LONG_SYSTEM, start_server
from tests.server.test_openai_api import expected_cached

SYSTEM_BLOCK_5M = [{"type": "text", "text": LONG_SYSTEM, "cache_control": {"type": "ephemeral"}}]


def prompt_ids(server, system: str, messages: list[dict]) -> list[int]:
    tok = server.tokenizer
    return tok.encode(tok.apply_chat_template([{"role": "system", "content": system}] + messages))


def system_prefix_tokens(server, system: str) -> int:
    tok = server.tokenizer
    n = len(tok.encode(tok.apply_chat_template([{"role": "system", "content": system}], add_generation_prompt=False)))
    return n - n % server.engine.block_size


def test_message_non_streaming(server):
    client = server.anthropic()
    m = client.messages.create(model="embedded", max_tokens=6,
                               messages=[{"role": "user", "content": "Say hi."}],
                               extra_body={"temperature": 0, "cache_salt": uuid.uuid4().hex})
    assert m.type == "message" and m.role == "assistant"
    assert m.content[0].type == "text" and m.content[0].text
    assert m.stop_reason in ("end_turn", "max_tokens")
    assert m.usage.cache_read_input_tokens == 0
    assert m.usage.cache_creation_input_tokens == 0
    assert m.usage.input_tokens == len(server.tokenizer.encode(
        server.tokenizer.apply_chat_template([{"role": "user", "content": "Say hi."}])))
    assert 1 <= m.usage.output_tokens <= 6


def test_message_streaming_matches(server):
    client = server.anthropic()
    # this SDK version has no `temperature` argument; the API (and radixserve) still take it
    kw = dict(model="embedded", max_tokens=10, extra_body={"temperature": 0}, system="Answer briefly.",
              messages=[{"role": "user", "content": "What is 2+2?"}])
    full = client.messages.create(**kw)
    with client.messages.stream(**kw) as stream:
        events = [e.type for e in stream]
        final = stream.get_final_message()
    assert events[0] == "message_start" and events[-1] == "message_stop"
    assert "content_block_start" in events and "message_delta" in events
    assert final.content[0].text == full.content[0].text
    assert final.stop_reason == full.stop_reason
    assert final.usage.output_tokens == full.usage.output_tokens
    assert final.usage.input_tokens + final.usage.cache_read_input_tokens == (
        full.usage.input_tokens + full.usage.cache_read_input_tokens)


def test_stop_sequences(server):
    m = server.anthropic().messages.create(
        model="embedded", max_tokens=40, extra_body={"temperature": 0}, stop_sequences=["3"],
        messages=[{"role": "user", "content": "Count from 1 to 10, separated by commas."}],
    )
    if m.stop_reason == "stop_sequence":
        assert m.stop_sequence == "3" and "3" not in m.content[0].text


def test_assistant_prefill_continues(server):
    m = server.anthropic().messages.create(
        model="embedded", max_tokens=5, extra_body={"temperature": 0},
        messages=[{"role": "user", "content": "Spell the word cat."}, {"role": "assistant", "content": "C-A"}],
    )
    assert m.content[0].text is not None


def test_cache_control_creation_then_read(server):
    client = server.anthropic()
    salt = uuid.uuid4().hex
    q1 = [{"role": "user", "content": "When is breakfast?"}]
    q2 = [{"role": "user", "content": "Can I check out late?"}]
    first = client.messages.create(model="embedded", max_tokens=2, system=SYSTEM_BLOCK_5M,
                                   messages=q1, extra_body={"temperature": 0, "cache_salt": salt})
    pinned = system_prefix_tokens(server, LONG_SYSTEM)
    assert pinned >= 160
    n1 = len(prompt_ids(server, LONG_SYSTEM, q1))
    assert first.usage.cache_read_input_tokens == 0
    assert first.usage.cache_creation_input_tokens == pinned
    assert first.usage.cache_creation.ephemeral_5m_input_tokens == pinned
    assert first.usage.cache_creation.ephemeral_1h_input_tokens == 0
    assert first.usage.input_tokens == n1 - pinned

    second = client.messages.create(model="embedded", max_tokens=2, system=SYSTEM_BLOCK_5M,
                                    messages=q2, extra_body={"cache_salt": salt})
    want = expected_cached(prompt_ids(server, LONG_SYSTEM, q1), prompt_ids(server, LONG_SYSTEM, q2), 16)
    assert want >= pinned
    assert second.usage.cache_read_input_tokens == want
    assert second.usage.cache_creation_input_tokens == 0
    assert second.usage.input_tokens == len(prompt_ids(server, LONG_SYSTEM, q2)) - want

    # the same numbers on the streaming path
    with client.messages.stream(model="embedded", max_tokens=2, system=SYSTEM_BLOCK_5M,
                                messages=q2, extra_body={"cache_salt": salt}) as stream:
        final = stream.get_final_message()
    ids = prompt_ids(server, LONG_SYSTEM, q2)
    assert final.usage.cache_read_input_tokens == expected_cached(ids, ids, 16)


def test_cache_control_on_message_block_with_1h(server):
    client = server.anthropic()
    doc = LONG_SYSTEM.replace("Lisbon", "Porto")
    messages = [{"role": "user", "content": [
        {"type": "text", "text": doc, "cache_control": {"type": "ephemeral", "ttl": "1h"}},
        {"type": "text", "text": "Summarise the document above."},
    ]}]
    m = client.messages.create(model="embedded", max_tokens=2, system="Be brief.", messages=messages,
                               extra_body={"cache_salt": uuid.uuid4().hex})
    created = m.usage.cache_creation_input_tokens
    tok = server.tokenizer
    # the system turn plus the user turn's first block, without the user turn's end marker
    through_doc = len(tok.encode(tok.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": doc}], add_generation_prompt=False)))
    assert through_doc - 2 - 16 < created <= through_doc - 2 and created % 16 == 0
    assert m.usage.cache_creation.ephemeral_1h_input_tokens == created
    assert m.usage.input_tokens + created == len(server.tokenizer.encode(server.tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": doc + "\n\nSummarise the document above."}])))


def test_short_breakpoints_are_not_pinned(embedded_model):
    with start_server(embedded_model, ServerConfig(min_cacheable_tokens=4096), num_blocks=256) as srv:
        m = srv.anthropic().messages.create(model="embedded", max_tokens=1, system=SYSTEM_BLOCK_5M,
                                            messages=[{"role": "user", "content": "Hi"}])
        assert m.usage.cache_creation_input_tokens == 0


def test_models_list_in_anthropic_shape(server):
    models = server.anthropic().models.list()
    assert [m.id for m in models.data] == ["SmolLM2-135M-Instruct"]
    assert models.data[0].type == "model"


def test_count_tokens(server):
    r = server.anthropic().messages.count_tokens(model="embedded", system="Be brief.",
                                                 messages=[{"role": "user", "content": "Hello"}])
    assert r.input_tokens == len(prompt_ids(server, "Be brief.", [{"role": "user", "content": "Hello"}]))


def _pressure(srv, n_tokens: int, seed: int) -> None:
    """A completion over n_tokens made-up token ids: makes the pool evict what it can."""
    ids = [(1000 + seed * 7919 + i * 31) % 40000 + 100 for i in range(n_tokens)]
    srv.openai().completions.create(model="embedded", prompt=ids, max_tokens=1)


@pytest.mark.slow
def test_breakpoint_pin_survives_pressure_until_ttl(embedded_model):
    """A 24-block pool; the pinned system prompt takes 6 blocks and a 273-token prompt needs
    all 18 others, so it evicts every unpinned block. "5m" is scaled down to `ttl` seconds."""
    ttl = 10.0
    config = ServerConfig(min_cacheable_tokens=32, cache_ttl_scale=ttl / 300)
    with start_server(embedded_model, config, num_blocks=24) as srv:
        client = srv.anthropic()
        system = LONG_SYSTEM[: len(LONG_SYSTEM) // 2]
        pinned_block = [{"type": "text", "text": system, "cache_control": {"type": "ephemeral"}}]
        pinned = system_prefix_tokens(srv, system)
        assert pinned >= 64
        other_system = "Dear guest, welcome! " + system  # shares no block with `system`
        pressure_tokens = (24 - pinned // 16 - 1) * 16 + 1  # its KV needs every unpinned block

        def ask(system, question):
            return client.messages.create(model="embedded", max_tokens=1, system=system,
                                          messages=[{"role": "user", "content": question}]).usage

        started = time.monotonic()
        assert ask(pinned_block, "When is breakfast?").cache_creation_input_tokens == pinned
        assert ask(other_system, "When is breakfast?").cache_read_input_tokens == 0  # the unpinned control
        _pressure(srv, pressure_tokens, 1)
        # No cache_control, but it reads the whole pinned prefix: that refreshes the pin to `ttl` again.
        hit = ask([{"type": "text", "text": system}], "Is there a pool?")
        refreshed = time.monotonic()
        if refreshed - started > ttl - 0.5:
            pytest.skip("the machine was too slow to finish before the TTL; nothing was checked")
        assert hit.cache_read_input_tokens == pinned  # the pinned system prompt survived the pressure ...
        assert ask(other_system, "When is breakfast?").cache_read_input_tokens == 0  # ... the unpinned one did not
        assert srv.metrics()["radixserve_prefix_cache_evicted_blocks_total"] > 0

        time.sleep(max(0.0, refreshed + ttl + 0.5 - time.monotonic()))
        _pressure(srv, 23 * 16 + 1, 2)  # needs the whole pool: possible only once the pin lapsed
        after = ask(pinned_block, "Is there a pool?")
        assert after.cache_read_input_tokens == 0  # the pin lapsed, so the pressure evicted it
        assert after.cache_creation_input_tokens == pinned  # ... and this request pinned it again
        m = srv.wait_idle()
        assert m["radixserve_kv_free_blocks"] + m["radixserve_prefix_cache_blocks"] == 24


@pytest.mark.parametrize("system, message", [
    ([{"type": "text", "text": "x", "cache_control": {"type": "persistent"}}], "must be 'ephemeral'"),
    ([{"type": "text", "text": "x", "cache_control": {"type": "ephemeral", "ttl": "10m"}}], "must be '5m' or '1h'"),
    ([{"type": "text", "text": "x", "cache_control": "yes"}], "must be an object"),
    ([{"type": "text", "text": "", "cache_control": {"type": "ephemeral"}}], "empty text blocks"),
    ([{"type": "text", "text": f"part {i}", "cache_control": {"type": "ephemeral"}} for i in range(5)],
     "A maximum of 4 blocks with cache_control may be provided. Found 5."),
    ([{"type": "text", "text": "a", "cache_control": {"type": "ephemeral"}},
      {"type": "text", "text": "b", "cache_control": {"type": "ephemeral", "ttl": "1h"}}], "longer TTLs go first"),
    ([{"type": "image", "source": {}}], "not supported"),
])
def test_bad_cache_control(server, system, message):
    with pytest.raises(anthropic.BadRequestError) as e:
        server.anthropic().messages.create(model="embedded", max_tokens=1, system=system,
                                           messages=[{"role": "user", "content": "Hi"}])
    assert e.value.status_code == 400
    assert e.value.body["type"] == "error"
    assert e.value.body["error"]["type"] == "invalid_request_error"
    assert message in e.value.body["error"]["message"]


def test_breakpoints_across_messages_count(server):
    cc = {"type": "ephemeral"}
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "a", "cache_control": cc}]},
        {"role": "assistant", "content": [{"type": "text", "text": "b", "cache_control": cc}]},
        {"role": "user", "content": [{"type": "text", "text": "c", "cache_control": cc}]},
    ]
    system = [{"type": "text", "text": "s", "cache_control": cc}]
    ok = server.anthropic().messages.create(model="embedded", max_tokens=1, system=system, messages=messages)
    assert ok.usage.output_tokens == 1
    # top-level cache_control marks the last block: no new breakpoint where one already is ...
    server.anthropic().messages.create(model="embedded", max_tokens=1, system=system, messages=messages,
                                       extra_body={"cache_control": cc})
    # ... but a fifth one otherwise
    messages.append({"role": "assistant", "content": "d"})
    messages.append({"role": "user", "content": "e"})
    with pytest.raises(anthropic.BadRequestError, match="Found 5"):
        server.anthropic().messages.create(model="embedded", max_tokens=1, system=system, messages=messages,
                                           extra_body={"cache_control": cc})


def test_unknown_model_is_anthropic_404(server):
    with pytest.raises(anthropic.NotFoundError) as e:
        server.anthropic().messages.create(model="claude-opus-9", max_tokens=1,
                                           messages=[{"role": "user", "content": "Hi"}])
    assert e.value.body["error"]["type"] == "not_found_error"
    assert "claude-opus-9" in e.value.body["error"]["message"]
