"""The opt-in request log: what the server writes is what `radixserve advise` replays."""

from __future__ import annotations

import json

import openai
import pytest

from radixserve.advisor.logs import read_log
from radixserve.server.config import ServerConfig
from tests.server.conftest import start_server


def test_request_log_records_accepted_requests(tmp_path, embedded_model):
    log = tmp_path / "requests.jsonl"
    with start_server(embedded_model, ServerConfig(request_log=str(log)), num_blocks=128) as server:
        client = server.openai()
        client.chat.completions.create(model="embedded", messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
        client.completions.create(model="embedded", prompt="Once upon", max_tokens=2)
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model="embedded", messages=[{"role": "user", "content": "x"}], max_tokens=-1)
        server.anthropic().messages.create(model="embedded", max_tokens=2, messages=[{"role": "user", "content": "Yo"}])
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [line["api"] for line in lines] == ["chat", "completions", "messages"]  # the bad one was not logged
    assert lines[0]["body"]["messages"] == [{"role": "user", "content": "Hi"}]
    assert lines[1]["body"]["prompt"] == "Once upon"
    replayable = read_log(log, embedded_model.tokenizer)  # the advisor reads the server's log as it is
    assert [r.api for r in replayable.requests] == ["chat", "completions", "messages"] and not replayable.skipped
