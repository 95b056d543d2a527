"""Advisor fixtures: the embedded model's tokenizer and shape (no weights), and generated logs."""

from __future__ import annotations

import pytest

from tests.advisor import generated_logs


@pytest.fixture(scope="session")
def advisor_model():
    """ModelInfo of the embedded SmolLM2: tokenizer, chat template and shape, read without weights."""
    from radixserve.advisor import load_model_info

    return load_model_info("embedded")


@pytest.fixture(scope="session")
def tokenizer(advisor_model):
    return advisor_model.tokenizer


@pytest.fixture(scope="session")
def shared_system_records(tokenizer):
    return generated_logs.shared_system_log(tokenizer)


@pytest.fixture(scope="session")
def request_id_records(tokenizer):
    return generated_logs.request_id_log(tokenizer)


@pytest.fixture(scope="session")
def interleaved_records(tokenizer):
    return generated_logs.interleaved_log(tokenizer)
