"""Tokenizer: a thin wrapper over a `tokenizers.Tokenizer`, plus the model's chat template.

Built from a GGUF file's metadata (byte-level BPE), from a Hugging Face folder
(tokenizer.json + tokenizer_config.json), or as a trivial byte-level fallback for dummy models.
"""

from __future__ import annotations

import functools
import hashlib
import json
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer

from radixserve.model.gguf_file import GGUFFile

# End-of-turn / end-of-text tokens that stop generation whenever the vocabulary has them. GGUFs
# often name the wrong EOS for chat (the embedded SmolLM2 says eos = bos = <|im_start|> in some
# builds), and HF configs list only one of several; a chat model must stop on all of these.
END_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>", "<|eom_id|>")

# ChatML, used only when a model ships no chat template (dummy models, base checkpoints).
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Pre-tokenizer split regexes by GGUF `tokenizer.ggml.pre` (the ones llama.cpp names most often).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLITS = {
    "llama3": _LLAMA3_SPLIT,
    "llama-v3": _LLAMA3_SPLIT,
    "llama-bpe": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT,
    "deepseek-r1-qwen": _QWEN2_SPLIT,
}

# GGUF token types (llama.cpp's llama_token_type).
_CONTROL = 3
_USER_DEFINED = 4


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table used by byte-level BPE vocabularies."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _token_content(value: Any) -> str | None:
    """tokenizer_config special tokens are either a string or {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


@functools.lru_cache(maxsize=16)
def _compile_template(source: str) -> jinja2.Template:
    """Compile a chat template the way transformers does (sandboxed, same helpers)."""

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys: bool = False) -> str:
        # Jinja's own tojson HTML-escapes; templates expect plain JSON.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env.from_string(source)


# encode_batch remembers texts of at least this many characters (a system prompt, a tool list),
# up to _REMEMBER_CHARS characters in all (least recently used forgotten first).
_REMEMBER_MIN_CHARS = 1024
_REMEMBER_CHARS = 1 << 22


class Tokenizer:
    """Text <-> token ids, special tokens, and chat-template rendering for one model."""

    def __init__(
        self,
        backend: HFTokenizer,
        *,
        chat_template: str | None = None,
        bos_token: str | None = None,
        eos_token: str | None = None,
        extra_eos_ids: Iterable[int] = (),
    ) -> None:
        self.backend = backend
        self.chat_template = chat_template
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.bos_token_id: int | None = backend.token_to_id(bos_token) if bos_token else None
        eos: set[int] = set(extra_eos_ids)
        if eos_token is not None and backend.token_to_id(eos_token) is not None:
            eos.add(backend.token_to_id(eos_token))
        for tok in END_TOKENS:
            tid = backend.token_to_id(tok)
            if tid is not None:
                eos.add(tid)
        self.eos_token_ids: set[int] = eos
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        self._fingerprint: str | None = None
        self._special_ids: frozenset[int] | None = None
        self._special_strings: tuple[str, ...] | None = None
        self._splits_at_specials: bool | None = None
        self._literal_backend: HFTokenizer | None = None  # specials spelled out, for client text
        self._max_token_bytes: int | None = None
        # Long texts encode_batch has seen, most recent last (see _REMEMBER_MIN_CHARS).
        self._remembered: OrderedDict[str, tuple[int, ...]] = OrderedDict()
        self._remembered_chars = 0
        self._remembered_lock = threading.Lock()  # prompts are tokenized in worker threads

    def __getstate__(self) -> dict:
        """Pickled (the engine core process hands its tokenizer to the server; a Ray replica to
        the ingress) without the lock and the memory of long texts: the copy starts afresh."""
        state = self.__dict__.copy()
        del state["_remembered_lock"]
        state["_remembered"], state["_remembered_chars"] = OrderedDict(), 0
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._remembered_lock = threading.Lock()

    # ---- construction -------------------------------------------------------------------

    @classmethod
    def from_gguf(cls, source: str | Path | GGUFFile) -> Tokenizer:
        """From a GGUF file path or an opened `GGUFFile` (byte-level BPE vocabularies only)."""
        gguf = source if isinstance(source, GGUFFile) else GGUFFile(source)
        get = gguf.get

        kind = get("tokenizer.ggml.model")
        if kind != "gpt2":
            raise ValueError(f"unsupported GGUF tokenizer model {kind!r} (only byte-level BPE, 'gpt2')")
        tokens: list[str] = get("tokenizer.ggml.tokens")
        merges: list[str] = get("tokenizer.ggml.merges") or []
        types: list[int] = get("tokenizer.ggml.token_type") or [1] * len(tokens)
        vocab = {tok: i for i, tok in enumerate(tokens)}
        bpe = models.BPE(
            vocab=vocab,
            merges=[tuple(m.split(" ", 1)) for m in merges],
            fuse_unk=False,
            byte_fallback=False,
        )
        tok = HFTokenizer(bpe)
        pre = get("tokenizer.ggml.pre", "default")
        if pre == "smollm":
            # SmolLM's tokenizer.json: every digit on its own, then GPT-2 byte-level splitting.
            tok.pre_tokenizer = pre_tokenizers.Sequence(
                [
                    pre_tokenizers.Digits(individual_digits=True),
                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
                ]
            )
        elif pre in _SPLITS:
            tok.pre_tokenizer = pre_tokenizers.Sequence(
                [
                    pre_tokenizers.Split(Regex(_SPLITS[pre]), behavior="isolated"),
                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
                ]
            )
        else:
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        # Control tokens (<|im_start|>...) must match whole in text and be skippable on decode.
        alphabet = set(bytes_to_unicode().values())
        special = [
            AddedToken(t, special=True, normalized=False)
            for t, ty in zip(tokens, types)
            if ty == _CONTROL and set(t) <= alphabet
        ]
        user = [AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == _USER_DEFINED]
        tok.add_special_tokens(special)
        if user:
            tok.add_tokens(user)

        bos_id = get("tokenizer.ggml.bos_token_id")
        eos_id = get("tokenizer.ggml.eos_token_id")
        bos = tokens[bos_id] if bos_id is not None and bos_id < len(tokens) else None
        eos = tokens[eos_id] if eos_id is not None and eos_id < len(tokens) else None
        if get("tokenizer.ggml.add_bos_token", False) and bos is not None:
            # Only used when a caller asks encode(add_special_tokens=True).
            tok.post_processor = processors.TemplateProcessing(
                single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
            )
        return cls(tok, chat_template=get("tokenizer.chat_template"), bos_token=bos, eos_token=eos)

    @classmethod
    def from_hf_folder(cls, folder: str | Path) -> Tokenizer:
        """From tokenizer.json, tokenizer_config.json (+ chat_template.jinja, generation_config.json)."""
        folder = Path(folder)
        tok_file = folder / "tokenizer.json"
        if not tok_file.is_file():
            raise FileNotFoundError(f"no tokenizer.json in {folder} (only fast tokenizers are supported)")
        backend = HFTokenizer.from_file(str(tok_file))
        cfg: dict[str, Any] = {}
        if (folder / "tokenizer_config.json").is_file():
            cfg = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
        template = cfg.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template}
            template = named.get("default") or next(iter(named.values()), None)
        if (folder / "chat_template.jinja").is_file():
            template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        elif template is None and (folder / "chat_template.json").is_file():
            template = json.loads((folder / "chat_template.json").read_text(encoding="utf-8")).get("chat_template")
        extra_eos: set[int] = set()
        for name in ("generation_config.json", "config.json"):
            path = folder / name
            if path.is_file():
                value = json.loads(path.read_text(encoding="utf-8")).get("eos_token_id")
                if isinstance(value, int):
                    extra_eos.add(value)
                elif isinstance(value, list):
                    extra_eos.update(v for v in value if isinstance(v, int))
        return cls(
            backend,
            chat_template=template,
            bos_token=_token_content(cfg.get("bos_token")),
            eos_token=_token_content(cfg.get("eos_token")),
            extra_eos_ids=extra_eos,
        )

    @classmethod
    def byte_level(cls) -> Tokenizer:
        """A vocabulary of the 256 bytes plus ChatML specials; for dummy models without a real one."""
        specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        table = bytes_to_unicode()
        # Byte b is id len(specials) + b.
        vocab = {t: i for i, t in enumerate(specials + [table[b] for b in range(256)])}
        tok = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
        return cls(tok, chat_template=None, eos_token="<|im_end|>")

    def padded_to(self, vocab_size: int) -> Tokenizer:
        """This tokenizer with ids up to vocab_size - 1: each new id decodes to the plain text
        " <id>", and no text ever encodes to one (no merge produces them). For dummy models whose
        vocabulary is larger than their tokenizer's: the ids past its end would decode to
        nothing, so a server would stream no text for most generated tokens. Byte-level BPE only."""
        if vocab_size <= self.vocab_size:
            return self
        data = json.loads(self.backend.to_str())
        model, decoder = data["model"], data.get("decoder") or {}
        if model.get("type") != "BPE" or decoder.get("type") != "ByteLevel":
            raise ValueError("only byte-level BPE tokenizers can be padded")
        vocab: dict[str, int] = model["vocab"]
        space = bytes_to_unicode()[ord(" ")]  # 'Ġ': how a byte-level vocabulary spells a space
        for i in range(self.vocab_size, vocab_size):
            token = f"{space}<{i}>"
            if token in vocab:
                raise ValueError(f"cannot pad: the vocabulary already has {token!r}")
            vocab[token] = i
        return Tokenizer(HFTokenizer.from_str(json.dumps(data)), chat_template=self.chat_template,
                         bos_token=self.bos_token, eos_token=self.eos_token, extra_eos_ids=self.eos_token_ids)

    # ---- use ----------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Text -> ids. Special tokens written in the text (e.g. <|im_start|>) become their ids;
        add_special_tokens=True additionally applies the model's BOS/EOS post-processing."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_literal(self, text: str) -> list[int]:
        """Text -> ids with special-token spellings read as plain text: "<|im_start|>" in a
        client's message becomes the tokens of those characters, never the control token."""
        if self._literal_backend is None:
            literal = HFTokenizer.from_str(self.backend.to_str())
            literal.encode_special_tokens = True
            self._literal_backend = literal
        return self._literal_backend.encode(text, add_special_tokens=False).ids

    @property
    def special_token_strings(self) -> tuple[str, ...]:
        """The spellings of the special (control) tokens, longest first."""
        if self._special_strings is None:
            added = self.backend.get_added_tokens_decoder()
            spellings = {t.content for t in added.values() if t.special and t.content}
            self._special_strings = tuple(sorted(spellings, key=lambda t: (-len(t), t)))
        return self._special_strings

    @property
    def splits_at_specials(self) -> bool:
        """Whether text may be tokenized in pieces cut before and after each special token, with
        exactly the ids of one call. The backend splits a text at its added tokens before it
        normalizes or pre-tokenizes anything, so this holds unless an added token strips the
        whitespace around it or the pre-tokenizer treats each piece's start specially (a prefix
        space): the tokens' options and a probe text rule both out. Checked once."""
        if self._splits_at_specials is None:
            self._splits_at_specials = self._check_splits_at_specials()
        return self._splits_at_specials

    def _check_splits_at_specials(self) -> bool:
        added = [t for t in self.backend.get_added_tokens_decoder().values() if t.special and t.content]
        if not added or any(t.lstrip or t.rstrip or t.single_word for t in added):
            return False
        for special in self.special_token_strings[:8]:
            pieces = ["a ", special, "\n b", special, " \nc. ", special, "  d"]
            if self.encode("".join(pieces)) != [i for piece in pieces for i in self.encode(piece)]:
                return False
        return True

    def min_num_tokens(self, num_bytes: int) -> int:
        """A lower bound on the tokens of any text of `num_bytes` UTF-8 bytes, without
        tokenizing it: no token covers more bytes than the longest vocabulary entry (a
        normalizer might shorten the text first, hence the margin when there is one)."""
        if self._max_token_bytes is None:
            vocab = self.backend.get_vocab(with_added_tokens=True)
            self._max_token_bytes = max((len(t.encode("utf-8")) for t in vocab), default=1)
        margin = 4 if self.backend.normalizer is not None else 1
        return num_bytes // (self._max_token_bytes * margin)

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = False) -> list[list[int]]:
        """Many texts at once (parallel inside `tokenizers`). Long texts are remembered (the most
        recent, up to _REMEMBER_CHARS characters in all): a chat prompt is tokenized in pieces
        cut at the template's control tokens (server/prompting.py), so a system prompt that
        every request repeats is one piece, tokenized once instead of per request."""
        if add_special_tokens:
            return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=True)]
        out: list[list[int] | None] = [None] * len(texts)
        with self._remembered_lock:
            for i, text in enumerate(texts):
                ids = self._remembered.get(text) if len(text) >= _REMEMBER_MIN_CHARS else None
                if ids is not None:
                    self._remembered.move_to_end(text)
                    out[i] = list(ids)
        missing = [i for i, ids in enumerate(out) if ids is None]
        if missing:
            encoded = self.backend.encode_batch([texts[i] for i in missing], add_special_tokens=False)
            for i, e in zip(missing, encoded):
                out[i] = e.ids
                if _REMEMBER_MIN_CHARS <= len(texts[i]) <= _REMEMBER_CHARS:
                    self._remember(texts[i], e.ids)
        return out  # type: ignore[return-value]

    def _remember(self, text: str, ids: list[int]) -> None:
        with self._remembered_lock:
            if text not in self._remembered:
                self._remembered[text] = tuple(ids)
                self._remembered_chars += len(text)
            while self._remembered_chars > _REMEMBER_CHARS:
                old, _ = self._remembered.popitem(last=False)
                self._remembered_chars -= len(old)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Ids -> text."""
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary string of an id (byte-level spelling, e.g. 'Ġhello'), None if out of range."""
        return self.backend.id_to_token(token_id)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def is_special(self, token_id: int) -> bool:
        """Whether decode(skip_special_tokens=True) drops this id."""
        return token_id in self.special_token_ids

    @property
    def special_token_ids(self) -> frozenset[int]:
        """Ids of the tokens registered as special (control tokens such as <|im_start|>)."""
        if self._special_ids is None:
            added = self.backend.get_added_tokens_decoder()
            self._special_ids = frozenset(i for i, t in added.items() if t.special)
        return self._special_ids

    def apply_chat_template(
        self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True, **kwargs: Any
    ) -> str:
        """Render a conversation to the prompt string with the model's template.

        Extra keyword arguments (tools, documents, enable_thinking, ...) reach the template as
        variables. A template may call raise_exception(msg) -> jinja2.TemplateError.
        """
        template = _compile_template(self.chat_template or DEFAULT_CHAT_TEMPLATE)
        context = {
            "bos_token": self.bos_token or "",
            "eos_token": self.eos_token or "",
            **kwargs,
            "messages": list(messages),
            "add_generation_prompt": add_generation_prompt,
        }
        return template.render(**context)

    def fingerprint(self) -> str:
        """Short hash of the vocabulary, merges and special tokens (for cache keys)."""
        if self._fingerprint is None:
            self._fingerprint = hashlib.sha256(self.backend.to_str().encode("utf-8")).hexdigest()[:16]
        return self._fingerprint

    def save(self, path: str | Path) -> None:
        """Write the underlying tokenizer as a tokenizer.json file."""
        self.backend.save(str(path))

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, eos_token_ids={sorted(self.eos_token_ids)})"
