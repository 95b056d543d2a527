"""The engine core in its own process (--engine-process on): same answers as in-thread, aborts
free the core's blocks, a killed core fails its requests cleanly, and no core outlives its server."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from radixserve.server import ServerConfig
from tests.live_server import wait_until_healthy
from tests.server.conftest import LONG_SYSTEM, start_server

LONG_RUN = {"max_tokens": 3000, "ignore_eos": True, "temperature": 0}


@pytest.fixture(scope="module")
def core_server(embedded_model):
    with start_server(embedded_model, engine_process=True) as running:
        yield running


def _core_pid(server) -> int:
    return server.state.async_engine.process.pid


def _chat(client: openai.OpenAI, question: str, **kw):
    return client.chat.completions.create(
        model="embedded", messages=[{"role": "system", "content": LONG_SYSTEM}, {"role": "user", "content": question}],
        temperature=0, max_tokens=24, **kw)


def test_answers_match_the_in_thread_engine(core_server, server):
    assert core_server.state.engine is None  # nothing of the engine in the server process
    questions = ["When is breakfast?", "Is the pool open in June?"]
    # twice each: the second time reads the cached system prompt
    ours, theirs = ([_chat(running.openai(), q) for q in questions + questions] for running in (core_server, server))
    for mine, reference in zip(ours, theirs, strict=True):
        assert mine.choices[0].message.content == reference.choices[0].message.content
        assert mine.usage.completion_tokens == reference.usage.completion_tokens
    # the repeats read what the first asks cached (the shared `server` may have cached more
    # before them, from other tests: only the repeats are comparable)
    for mine, reference in zip(ours[2:], theirs[2:], strict=True):
        assert mine.usage.prompt_tokens_details.cached_tokens == reference.usage.prompt_tokens_details.cached_tokens > 0
    # streamed deltas concatenate to the same text, logprobs included
    stream = _chat(core_server.openai(), questions[0], stream=True, logprobs=True, top_logprobs=2)
    chunks = [c for c in stream if c.choices]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == ours[0].choices[0].message.content
    assert sum(len(c.choices[0].logprobs.content) for c in chunks if c.choices[0].logprobs) == 24


def test_n_choices_stop_strings_and_named_calls(core_server):
    client = core_server.openai()
    out = client.completions.create(model="embedded", prompt="1, 2, 3, 4,", max_tokens=12, temperature=0, n=2,
                                    stop=[" 7"])
    assert [c.text for c in out.choices] == [" 5, 6,", " 5, 6,"]
    assert all(c.finish_reason == "stop" for c in out.choices)
    with core_server.http() as http:
        assert http.get("/health").json() == {"status": "ok"}
        assert http.post("/reset_prefix_cache").json()["freed_blocks"] >= 0
    core_server.engine.check_cache_invariants()  # a named call answered by the core


def test_bad_input_raised_in_the_core_reaches_only_its_client(core_server):
    client = core_server.openai()
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model="embedded", prompt=[10**9], max_tokens=4)  # a token outside the vocabulary
    assert "vocabulary" in str(bad.value)
    assert client.completions.create(model="embedded", prompt="Hello", max_tokens=2).choices[0].text != ""


def test_disconnect_aborts_and_the_core_frees_its_blocks(core_server):
    before = core_server.wait_idle()
    with httpx.Client(base_url=core_server.base_url, timeout=60) as http:
        body = {"model": "embedded", "prompt": "Once upon a time", "stream": True, **LONG_RUN}
        with http.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            received = 0
            for line in r.iter_lines():
                received += line.startswith("data:")
                if received == 3:  # still reading: the request runs in the core
                    assert core_server.metrics()["radixserve_num_requests_running"] == 1
                    break
    m = core_server.wait_idle()  # the core's gauges, through the snapshot call
    assert m["radixserve_kv_free_blocks"] + m["radixserve_prefix_cache_blocks"] == m["radixserve_kv_total_blocks"]
    assert m["radixserve_requests_aborted_total"] == before["radixserve_requests_aborted_total"] + 1
    assert m["radixserve_generation_tokens_total"] - before["radixserve_generation_tokens_total"] < 1000
    core_server.engine.check_cache_invariants()


def _saved_pin_edges(state_dir: Path) -> list:
    path = state_dir / "server-state.json"
    return json.loads(path.read_text())["data"].get("pin_edges", []) if path.exists() else []


@pytest.mark.slow
def test_killed_core_fails_streams_cleanly_and_health_says_so(embedded_model, tmp_path: Path):
    config = ServerConfig(min_cacheable_tokens=32, state_dir=str(tmp_path))
    with start_server(embedded_model, config, engine_process=True) as srv:
        pinned = srv.anthropic().messages.create(  # a cache_control pin the state file keeps
            model="embedded", max_tokens=2, messages=[{"role": "user", "content": "Hi"}],
            system=[{"type": "text", "text": LONG_SYSTEM, "cache_control": {"type": "ephemeral"}}])
        assert pinned.usage.cache_creation_input_tokens > 0
        deadline = time.monotonic() + 60
        while not _saved_pin_edges(tmp_path):
            assert time.monotonic() < deadline, "the pin was never saved"
            time.sleep(0.2)
        client = srv.openai()
        stream = client.chat.completions.create(
            model="embedded", messages=[{"role": "user", "content": "Tell me a long story."}], stream=True,
            max_tokens=3000, temperature=0, extra_body={"ignore_eos": True})
        waiting = client.chat.completions.create(  # a second request, still streaming when the core dies
            model="embedded", messages=[{"role": "user", "content": "And another one."}], stream=True,
            max_tokens=3000, temperature=0, extra_body={"ignore_eos": True})
        received = 0
        for _ in stream:
            received += 1
            if received == 3:
                os.kill(_core_pid(srv), signal.SIGKILL)
                break
        with pytest.raises(openai.APIError, match="engine process exited"):
            for _ in stream:  # the rest of this stream: an error event, not a hang
                pass
        with pytest.raises(openai.APIError, match="engine process exited"):
            for _ in waiting:
                pass
        with srv.http() as http:
            health = http.get("/health")
            assert health.status_code == 503
            r = http.post("/v1/completions", json={"model": "embedded", "prompt": "Hi", "max_tokens": 2})
            assert r.status_code == 503 and "engine process exited" in r.json()["error"]["message"]
            assert http.get("/metrics").status_code == 503
    # the server stopped without its engine: the state file still holds the pin for a restart
    assert _saved_pin_edges(tmp_path)


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def _gone(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"  # a zombie waits for its reaper only


def _wait_gone(pid: int, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not _gone(pid):
        assert time.monotonic() < deadline, f"{what} (pid {pid}) is still running"
        time.sleep(0.2)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_no_core_outlives_its_server(tmp_path: Path, sig: int):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log_path = tmp_path / "server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "radixserve", "serve", "--port", str(port), "--engine-process", "on",
             "--num-blocks", "256"], stdout=log, stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(base, proc, log_path.read_text, poll=0.3)
        (core,) = _children(proc.pid)
        r = httpx.post(f"{base}/v1/completions", json={"model": "embedded", "prompt": "Hi", "max_tokens": 2}, timeout=60)
        assert r.status_code == 200
        proc.send_signal(sig)
        proc.wait(timeout=60)
        _wait_gone(core, "the engine core")
        if sig == signal.SIGTERM:  # a clean shutdown (uvicorn re-raises the signal once it is done)
            assert proc.returncode in (0, -signal.SIGTERM), log_path.read_text()
            assert "Application shutdown complete" in log_path.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _environ(pid: int) -> dict[str, str]:
    items = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().split("=", 1) for item in items if b"=" in item)


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="reads /proc")
def test_core_threads_sleep_at_once_unless_a_spin_count_is_given(core_server, monkeypatch):
    from radixserve.config import EngineConfig, ModelConfig
    from radixserve.server.engine_process import EngineProcessClient

    default = _environ(_core_pid(core_server))
    assert default["OMP_WAIT_POLICY"] == "PASSIVE" and "GOMP_SPINCOUNT" not in default
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    client = EngineProcessClient.launch(EngineConfig(model=ModelConfig(source="dummy:tiny", show_progress=False)),
                                        log_level="warning", spin_count=10000)
    try:
        spinning = _environ(client.process.pid)
        assert spinning["OMP_WAIT_POLICY"] == "PASSIVE" and spinning["GOMP_SPINCOUNT"] == "10000"
    finally:
        client._kill()
        shutil.rmtree(client._directory, ignore_errors=True)
