"""IncrementalDetokenizer: the text it grows token by token is the full decode's, never more."""

from __future__ import annotations

import random

import pytest

from radixserve.detokenizer import IncrementalDetokenizer

TEXTS = [
    "Hello, world! The capital of France is Paris.",
    "naïve café — 東京タワー 🚀🎉 and ünïcödé, then ASCII again.",
    "  leading spaces,\n\nnew lines\tand tabs, 12345 numbers.",
]


@pytest.fixture(scope="module")
def tokenizer(embedded_model):
    return embedded_model.tokenizer


def _check_growth(tokenizer, ids: list[int]) -> None:
    detok = IncrementalDetokenizer(tokenizer)
    for k in range(1, len(ids) + 1):
        text = detok.update(ids[:k])
        full = tokenizer.decode(ids[:k])
        assert full.startswith(text), (k, text, full)
        if not full.endswith("\ufffd"):
            assert text == full, (k, text, full)


@pytest.mark.parametrize("text", TEXTS)
def test_text_grows_like_the_full_decode(tokenizer, text):
    _check_growth(tokenizer, tokenizer.encode(text))


def test_random_ids_including_split_characters(tokenizer):
    # random ids decode to byte fragments: characters split across tokens, special tokens, ...
    rng = random.Random(0)
    for _ in range(20):
        _check_growth(tokenizer, [rng.randrange(tokenizer.vocab_size) for _ in range(40)])


def test_engine_text_equals_the_full_decode(make_engine):
    from radixserve.sampling import SamplingParams

    engine = make_engine()
    prompt = engine.tokenizer.encode("Write three emoji and a word in Japanese:")
    for seed in range(3):
        req = engine.add_request(prompt, SamplingParams(max_tokens=24, temperature=1.0, seed=seed, ignore_eos=True))
        streamed = ""
        while engine.has_unfinished_requests():
            for out in engine.step():
                streamed += out.new_text
        assert req.output_text == engine.tokenizer.decode(req.output_token_ids)
        assert streamed == req.output_text
