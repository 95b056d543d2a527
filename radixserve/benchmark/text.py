"""Seeded synthetic text, sized in tokens, so benchmarks need no downloaded data set.

Every word of the vocabulary below is one token with its leading space in the embedded model's
byte-level BPE (and in the Llama 3 / GPT-style vocabularies), and a sentence of k words ends
with a period, so a sentence costs about k + 1 tokens. `TextGenerator.text(n)` therefore lands
within a few tokens of n with the embedded tokenizer. For other tokenizers, `token_scale`
(measured tokens per estimated token, see loadgen.calibrate_token_scale) corrects the estimate.
"""

from __future__ import annotations

import random
import string

WORDS: tuple[str, ...] = tuple(
    """the of and to in is was for on that with as by at from this are be it an which or have has not
    their more other were all its been can into time when only new some these two may first after
    system policy customer order account request answer document section model cache token server
    travel hotel price museum river mountain harbour ticket station market library garden bridge
    report water city people year world school family group country problem service place case week
    company number point government night area house state money story student month book room fact
    job word business issue side kind head life hand part child eye woman man work home process power
    energy music data table field value result record message letter paper island forest valley coast
    village street road train flight airport engine network signal screen window door floor wall
    kitchen dinner lunch coffee tea bread apple orange summer winter spring autumn morning evening
    weather storm lake ocean""".split()
)

# Sentence-initial words: still one token when capitalized.
_OPENERS: tuple[str, ...] = (
    "the", "this", "each", "every", "some", "many", "our", "their", "its", "a", "one", "when", "after",
)

TOPICS: tuple[str, ...] = (
    "hotel", "museum", "river", "harbour", "ticket", "station", "market", "library", "garden", "bridge",
    "policy", "customer", "account", "document", "server", "cache", "flight", "airport", "network", "coffee",
)


class TextGenerator:
    """Deterministic word-salad sentences from one `random.Random`.

    token_scale: tokens the target tokenizer spends per token of the estimate (1.0 for the
    embedded model). Lengths passed to the methods are in target tokens.
    """

    def __init__(self, rng: random.Random, token_scale: float = 1.0) -> None:
        if token_scale <= 0:
            raise ValueError(f"token_scale must be > 0, got {token_scale}")
        self.rng = rng
        self.token_scale = token_scale

    def _units(self, num_tokens: int) -> int:
        return max(1, round(num_tokens / self.token_scale))

    def text(self, num_tokens: int) -> str:
        """Sentences of 6-16 words totalling about `num_tokens` tokens."""
        budget = self._units(num_tokens)
        sentences = []
        while budget > 0:
            n = min(self.rng.randint(6, 16), budget - 1) if budget > 2 else budget
            n = max(1, n)
            words = [self.rng.choice(_OPENERS).capitalize()] + [self.rng.choice(WORDS) for _ in range(n - 1)]
            sentences.append(" ".join(words) + ".")
            budget -= n + 1
        return " ".join(sentences)

    def words(self, num_tokens: int) -> str:
        """Lowercase words without punctuation, about `num_tokens` tokens."""
        return " ".join(self.rng.choice(WORDS) for _ in range(self._units(num_tokens)))

    def question(self, num_tokens: int, number: int) -> str:
        """A question of about `num_tokens` tokens (at least ~8)."""
        topic = self.rng.choice(TOPICS)
        head = f"Question {number}: what does it say about the {topic}"
        rest = max(0, num_tokens - 10 - len(str(number)))
        tail = (" and " + self.words(rest)) if rest > 1 else ""
        return head + tail + "?"

    def hex_id(self, length: int = 12) -> str:
        return "".join(self.rng.choice(string.hexdigits[:16]) for _ in range(length))
