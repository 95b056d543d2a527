"""Reading request logs: formats, rendering parity with the server, timestamps, namespaces, errors."""

from __future__ import annotations

import json
import os
import stat
import threading

import pytest

from radixserve.advisor import RequestLogWriter, read_log, requests_from_bodies
from radixserve.errors import InvalidRequestError
from radixserve.server.prompting import ChatTurn, build_prompt


def _write(tmp_path, lines) -> str:
    path = tmp_path / "log.jsonl"
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return str(path)


def test_writer_appends_one_line_per_request_from_many_threads(tmp_path):
    path = tmp_path / "logs" / "requests.jsonl"
    writer = RequestLogWriter(path, clock=lambda: 123.5)
    body = {"model": "m", "messages": [{"role": "user", "content": "x" * 500}]}

    def work(k: int) -> None:
        for j in range(50):
            writer.write("chat", {**body, "n": k * 100 + j}, namespace="salt:a" if k % 2 else "")

    threads = [threading.Thread(target=work, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    writer.close()
    lines = path.read_text().splitlines()
    records = [json.loads(line) for line in lines]  # no interleaved partial lines
    assert len(records) == 400 == writer.num_written
    assert sorted(r["body"]["n"] for r in records) == sorted(k * 100 + j for k in range(8) for j in range(50))
    assert all(r["ts"] == 123.5 and r["api"] == "chat" for r in records)
    assert {r.get("namespace", "") for r in records} == {"", "salt:a"}
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600  # prompts can be sensitive
    with pytest.raises(RuntimeError):
        writer.write("chat", body)
    with pytest.raises(ValueError):
        RequestLogWriter(tmp_path / "other.jsonl").write("embeddings", body)


def test_writer_log_reads_back(tmp_path, tokenizer):
    path = tmp_path / "requests.jsonl"
    with RequestLogWriter(path) as writer:
        writer.write("chat", {"model": "m", "messages": [{"role": "user", "content": "Hello"}]}, namespace="salt:t1")
        writer.write("completions", {"model": "m", "prompt": ["one", "two"]})
        writer.write("messages", {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "Hi"}]})
    log = read_log(path, tokenizer)
    assert [r.api for r in log.requests] == ["chat", "completions", "completions", "messages"]
    assert [r.namespace for r in log.requests] == ["salt:t1", "", "", ""]
    assert log.has_timestamps and not log.skipped


def test_chat_bodies_render_exactly_as_the_server_does(tmp_path, tokenizer):
    system = "You are terse."
    openai_body = {
        "model": "embedded",
        "messages": [
            {"role": "developer", "content": system},
            {"role": "user", "content": [{"type": "text", "text": "Part one. "}, {"type": "text", "text": "Part two."}]},
        ],
    }
    anthropic_body = {
        "model": "embedded",
        "max_tokens": 10,
        "system": [{"type": "text", "text": "Block A"}, {"type": "text", "text": "Block B"}],
        "messages": [{"role": "user", "content": "Question?"}, {"role": "assistant", "content": "The answer is"}],
    }
    log = read_log(_write(tmp_path, [{"api": "chat", "body": openai_body}, anthropic_body]), tokenizer)
    chat, messages = log.requests
    assert messages.api == "messages"  # detected from the top-level system
    # OpenAI: developer -> system, text parts concatenated (server/openai_protocol.py).
    expected_chat = build_prompt(tokenizer, [ChatTurn("system", [system]), ChatTurn("user", ["Part one. Part two."])])
    assert chat.token_ids == expected_chat.token_ids
    # Anthropic: system blocks are paragraphs, a final assistant message prefills the reply.
    expected_msg = build_prompt(
        tokenizer, [ChatTurn("system", ["Block A", "Block B"]), ChatTurn("user", ["Question?"])], "The answer is"
    )
    assert messages.token_ids == expected_msg.token_ids


def test_completion_prompts_token_ids_and_bare_prompts(tmp_path, tokenizer):
    lines = [
        {"model": "m", "prompt": ["alpha beta", "gamma"]},
        {"prompt": [1, 2, 3, 4]},
        {"prompt": [[5, 6], [7, 8, 9]]},
        {"url": "/v1/completions", "custom_id": "x", "method": "POST", "body": {"model": "m", "prompt": "delta"}},
    ]
    log = read_log(_write(tmp_path, lines), tokenizer)
    ids = [r.token_ids for r in log.requests]
    assert ids[0] == tokenizer.encode("alpha beta") and ids[1] == tokenizer.encode("gamma")
    assert ids[2:5] == [[1, 2, 3, 4], [5, 6], [7, 8, 9]]
    assert ids[5] == tokenizer.encode("delta")
    assert [r.line for r in log.requests] == [1, 1, 2, 3, 3, 4]
    assert log.api_counts == {"completions": 3, "prompt": 3}


def test_timestamps_namespaces_and_bad_lines(tmp_path, tokenizer):
    lines = [
        {"timestamp": "2024-05-01T12:00:00Z", "prompt": "a"},
        {"ts": 1714564810000, "prompt": "b", "cache_salt": "tenant-7"},  # milliseconds
        "this is not json",
        {"foo": 1},
        {"api": "embeddings", "body": {"input": "x"}},
        {"prompt": ""},
        {"prompt": [999999]},  # outside the vocabulary
        "",
        {"time": 1714564820.5, "namespace": "key:abc", "body": {"prompt": "c"}},
    ]
    log = read_log(_write(tmp_path, lines), tokenizer, vocab_size=tokenizer.vocab_size)
    assert [r.timestamp for r in log.requests] == [1714564800.0, 1714564810.0, 1714564820.5]
    assert [r.namespace for r in log.requests] == ["", "salt:tenant-7", "key:abc"]
    reasons = {s.line: s.reason for s in log.skipped}
    assert set(reasons) == {3, 4, 5, 6, 7}
    assert "JSON" in reasons[3] and "messages" in reasons[4] and "embeddings" in reasons[5]
    assert "empty" in reasons[6] and "vocabulary" in reasons[7]


def test_bodies_the_server_refuses_are_read_from_their_text(tmp_path, tokenizer):
    body = {
        "model": "m",
        "tools": [{"type": "function", "function": {"name": "f"}}],
        "messages": [
            {"role": "user", "content": [
                {"type": "text", "text": "Look:"}, {"type": "image_url", "image_url": {"url": "x"}},
            ]},
        ],
    }
    log = read_log(_write(tmp_path, [body]), tokenizer)
    assert log.lenient["tools"] == 1 and log.lenient["image_url"] == 1
    text = tokenizer.decode(log.requests[0].token_ids, skip_special_tokens=False)
    assert "Look:[image_url]" in text


def test_empty_or_useless_log_is_an_error(tmp_path, tokenizer):
    with pytest.raises(InvalidRequestError, match="no usable request"):
        read_log(_write(tmp_path, ["{}", "[1, 2]"]), tokenizer)
    with pytest.raises(InvalidRequestError, match="not found"):
        read_log(tmp_path / "missing.jsonl", tokenizer)


def test_requests_from_bodies(tokenizer):
    reqs = requests_from_bodies([{"prompt": "x y"}, {"messages": [{"role": "user", "content": "hi"}]}], tokenizer)
    assert [r.index for r in reqs] == [0, 1]
    assert reqs[0].token_ids == tokenizer.encode("x y")
    assert reqs[1].api == "chat"
