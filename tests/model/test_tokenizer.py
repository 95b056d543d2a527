"""Tokenizer: our GGUF tokenizer vs transformers' GGUF tokenizer, chat templates, fallbacks."""

from __future__ import annotations

import random
import re

import jinja2
import pytest

from radixserve.model.tokenizer import Tokenizer

TEXTS = [
    "Hello world",
    "The year 2024 had 366 days; π≈3.14159, 1,000,000 and 0.5%.",
    "a1b2c3 x86_64 v2.0.1-rc3",
    "   leading spaces\n\n\ttabs\r\nand CRLF  \n",
    "héllo wörld — naïve café; Ελληνικά; Русский; 日本語のテキスト; 한국어; عربى",
    "emoji 🎉🚀👩‍👩‍👧 and zero\u200bwidth",
    'def f(x: int) -> int:\n    """Square."""\n    return x ** 2  # comment\n\nprint(f(12))\n',
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "text with <|endoftext|> inside and <|im_end|>",
    "don't I'll we're they've SHOUTING CamelCase snake_case",
    "",
    " ",
    "\n",
    "<html><body class=\"x\">&amp;</body></html>",
]

_POOL = list("abcXYZ019 _-+*/.,;:!?'\"()[]{}<>|\\\n\t") + ["é", "ß", "日", "本", "🎉", "  ", "<|im_end|>", "<|im_start|>", "12345"]


def _random_texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(_POOL) for _ in range(rng.randint(1, 40))) for _ in range(n)]


@pytest.fixture(scope="module")
def hf_gguf_tokenizer(embedded_gguf):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(embedded_gguf.parent), gguf_file=embedded_gguf.name)


# transformers' GGUF converter gives "smollm" files plain GPT-2 splitting, without the
# individual-digit split that llama.cpp (regex "\p{N}" first) and SmolLM2's own tokenizer.json
# apply. The two agree except where a run of 2+ whitespace characters precedes a digit:
# "x  1" is x|ĠĠ|1 for llama.cpp and SmolLM2, x|Ġ|Ġ1->Ġ|1 for transformers' GGUF tokenizer.
_WS_BEFORE_DIGIT = re.compile(r"\s{2,}\d")


def _all_texts(tok: Tokenizer) -> list[str]:
    chat = tok.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Count: 1 2 3 🎉"}]
    )
    return TEXTS + [chat] + _random_texts(300)


@pytest.mark.slow
def test_ids_match_transformers_gguf_tokenizer(embedded_tokenizer, hf_gguf_tokenizer):
    compared = 0
    for text in _all_texts(embedded_tokenizer):
        ours = embedded_tokenizer.encode(text)
        assert embedded_tokenizer.decode(ours, skip_special_tokens=False) == text
        if _WS_BEFORE_DIGIT.search(text):
            continue
        ref = hf_gguf_tokenizer.encode(text, add_special_tokens=False)
        assert ours == ref, f"mismatch on {text!r}"
        assert embedded_tokenizer.decode(ours) == hf_gguf_tokenizer.decode(ref, skip_special_tokens=True)
        compared += 1
    assert compared > 200


@pytest.mark.slow
def test_ids_match_smollm_pretokenizer_everywhere(embedded_tokenizer, hf_gguf_tokenizer):
    """transformers' vocabulary/merges/special tokens + SmolLM2's real pre-tokenizer == ours on all text."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import pre_tokenizers

    ref = Backend.from_str(hf_gguf_tokenizer.backend_tokenizer.to_str())
    ref.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    )
    for text in _all_texts(embedded_tokenizer):
        assert embedded_tokenizer.encode(text) == ref.encode(text, add_special_tokens=False).ids, text
    tokens = [embedded_tokenizer.id_to_token(i) for i in embedded_tokenizer.encode("x  1")]
    assert tokens == ["x", "ĠĠ", "1"]


@pytest.mark.slow
def test_chat_template_matches_transformers(embedded_tokenizer, hf_gguf_tokenizer):
    for msgs in (
        [{"role": "user", "content": "Hi"}],
        [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}],
    ):
        for gen in (True, False):
            ours = embedded_tokenizer.apply_chat_template(msgs, add_generation_prompt=gen)
            ref = hf_gguf_tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
            assert ours == ref


def test_chat_template_expected_string(embedded_tokenizer):
    s = embedded_tokenizer.apply_chat_template([{"role": "user", "content": "What is 2+2?"}])
    assert s == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    s = embedded_tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"}], add_generation_prompt=False
    )
    assert s == "<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    ids = embedded_tokenizer.encode(s)
    assert ids[0] == embedded_tokenizer.token_to_id("<|im_start|>")
    assert ids.count(embedded_tokenizer.token_to_id("<|im_end|>")) == 2
    assert embedded_tokenizer.decode(ids) == "system\nBe terse.\nuser\nHi\n"


def test_special_tokens_and_eos(embedded_tokenizer):
    tok = embedded_tokenizer
    im_end, im_start, eot = (tok.token_to_id(t) for t in ("<|im_end|>", "<|im_start|>", "<|endoftext|>"))
    assert {im_end, eot} <= tok.eos_token_ids
    assert im_start not in tok.eos_token_ids  # the GGUF's BOS must never stop generation
    assert tok.bos_token_id == im_start
    assert tok.vocab_size == 49152
    assert tok.id_to_token(tok.encode(" hello")[0]) == "Ġhello"
    assert tok.encode("hello", add_special_tokens=True) == tok.encode("hello")  # SmolLM2 adds no BOS
    assert tok.is_special(im_end) and not tok.is_special(tok.encode("a")[0])
    assert len(tok.fingerprint()) == 16


def test_template_helpers(embedded_tokenizer):
    tok = Tokenizer(
        embedded_tokenizer.backend,
        chat_template=(
            "{% if messages|length == 0 %}{{ raise_exception('no messages') }}{% endif %}"
            "{{ messages|tojson }}|{{ extra }}|{{ eos_token }}"
        ),
        eos_token="<|im_end|>",
    )
    assert tok.apply_chat_template([{"role": "user", "content": "é<"}], extra=7) == (
        '[{"role": "user", "content": "é<"}]|7|<|im_end|>'
    )
    with pytest.raises(jinja2.TemplateError, match="no messages"):
        tok.apply_chat_template([])


def test_byte_level_fallback():
    tok = Tokenizer.byte_level()
    text = "héllo 🎉\n<|im_start|>x"
    ids = tok.encode(text)
    assert tok.decode(ids, skip_special_tokens=False) == text
    assert tok.token_to_id("<|im_start|>") in ids
    assert tok.vocab_size == 259 and tok.token_to_id("<|im_end|>") in tok.eos_token_ids
    assert tok.encode("A") == [3 + ord("A")]
    assert "<|im_start|>assistant\n" in tok.apply_chat_template([{"role": "user", "content": "x"}])


def test_padded_to_covers_a_larger_model_vocabulary():
    """Dummy models sample any id of their vocabulary: the padded ids decode to text, and text
    still encodes exactly as before (no merge reaches the new ids)."""
    tok = Tokenizer.byte_level()
    padded = tok.padded_to(1000)
    assert padded.vocab_size == 1000 and tok.padded_to(259) is tok
    text = "héllo <300> <|im_end|>"
    assert padded.encode(text) == tok.encode(text)
    assert padded.decode([300, 3 + ord("A"), 999]) == " <300>A <999>"
    assert padded.eos_token_ids == tok.eos_token_ids and padded.special_token_ids == tok.special_token_ids
    assert padded.fingerprint() != tok.fingerprint()


def test_encode_batch_remembers_long_texts_exactly(embedded_tokenizer, monkeypatch):
    """A long piece (a system prompt every request repeats) is tokenized once; what comes back
    from memory is exactly what tokenizing gives, and the memory stays within its bound."""
    from radixserve.model import tokenizer as tokenizer_module

    tok = Tokenizer(embedded_tokenizer.backend, chat_template=embedded_tokenizer.chat_template)  # a fresh memory
    long_texts = [" ".join(_random_texts(200, seed=s)) for s in range(3)]
    assert all(len(t) >= tokenizer_module._REMEMBER_MIN_CHARS for t in long_texts)
    short = "a short question?"
    first = tok.encode_batch([long_texts[0], short])
    assert first == [tok.encode(long_texts[0]), tok.encode(short)]
    assert list(tok._remembered) == [long_texts[0]]  # the short text is not kept
    first[0].append(-1)  # a caller extending its list does not touch the memory
    calls = []
    real = tok.backend.encode_batch
    monkeypatch.setattr(tok, "backend", type("Spy", (), {
        "encode_batch": lambda self, texts, add_special_tokens: calls.append(texts) or real(texts, add_special_tokens),
    })())  # fmt: skip
    again = tok.encode_batch([long_texts[0], short])
    assert again == [tok.encode_batch([long_texts[0]])[0], first[1]] and again[0][-1] != -1
    assert calls[0] == [short]  # only the short text was tokenized again
    # the bound: room for two of the long texts -> the least recently used one goes
    monkeypatch.setattr(tokenizer_module, "_REMEMBER_CHARS", max(map(len, long_texts)) * 2 + 1)
    monkeypatch.setattr(tok, "backend", embedded_tokenizer.backend)
    tok.encode_batch(long_texts[1:])
    assert list(tok._remembered) == long_texts[1:]
    assert tok._remembered_chars == len(long_texts[1]) + len(long_texts[2])


def test_a_tokenizer_that_remembered_texts_pickles_and_starts_afresh(embedded_tokenizer):
    """The engine core process and Ray replicas hand their tokenizer over by pickle: the lock
    and the memory of long texts stay behind, the ids do not change."""
    import pickle

    text = "You are a careful assistant. " * 40
    ids = embedded_tokenizer.encode_batch([text])[0]
    copy = pickle.loads(pickle.dumps(embedded_tokenizer))
    assert copy.encode_batch([text])[0] == ids
    assert copy.encode("hello world") == embedded_tokenizer.encode("hello world")
