"""Bad input gets a clear, typed error and never breaks the engine."""

from __future__ import annotations

import subprocess
import sys

import pytest

from radixserve.errors import InvalidRequestError, PromptTooLongError
from radixserve.sampling import SamplingParams
from tests.conftest import run_to_completion


def test_empty_prompt(make_engine):
    engine = make_engine()
    with pytest.raises(InvalidRequestError, match="empty"):
        engine.add_request("", SamplingParams())
    with pytest.raises(InvalidRequestError, match="empty"):
        engine.add_request([], SamplingParams())


def test_negative_or_zero_max_tokens():
    with pytest.raises(InvalidRequestError, match="max_tokens"):
        SamplingParams(max_tokens=-1)
    with pytest.raises(InvalidRequestError, match="max_tokens"):
        SamplingParams(max_tokens=0)


def test_prompt_longer_than_context(make_engine):
    engine = make_engine()
    too_long = [42] * (engine.max_model_len + 1)
    with pytest.raises(PromptTooLongError, match="context length"):
        engine.add_request(too_long, SamplingParams())
    with pytest.raises(PromptTooLongError, match="max_tokens"):
        engine.add_request([42] * 100, SamplingParams(max_tokens=engine.max_model_len))


def test_out_of_vocabulary_token(make_engine):
    engine = make_engine()
    with pytest.raises(InvalidRequestError, match="vocabulary"):
        engine.add_request([1, 2, 10**9], SamplingParams())


def test_engine_keeps_serving_after_bad_input(make_engine):
    engine = make_engine()
    with pytest.raises(InvalidRequestError):
        engine.add_request("", SamplingParams())
    engine.add_request("Hello", SamplingParams(max_tokens=3, temperature=0), request_id="ok")
    assert len(run_to_completion(engine)["ok"].token_ids) >= 1


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "radixserve.cli", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "/no/such/model"], "not found"),
        (["--prompt", "hi", "--max-tokens", "-3"], "max_tokens"),
        (["--prompt", ""], "empty"),
    ],
)
def test_cli_errors_are_one_clear_line(args, message):
    if "--prompt" not in args:
        args = [*args, "--prompt", "hi"]
    result = _cli("generate", *args)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert message in result.stderr.lower()
