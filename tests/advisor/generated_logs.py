"""Request logs with known structure, for the advisor's tests (deterministic, seeded)."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

_WORDS = (
    "account answer archive balance billing cache cluster customer deploy document engine error export "
    "feature gateway guide invoice latency limit metric model network order policy prompt quota region "
    "release report request retry schedule server service session storage support team ticket token "
    "update usage user version warehouse window workflow always never briefly carefully clearly politely "
    "check confirm explain escalate include mention prefer refuse summarize verify"
).split()

# Distinct leading digits: every pair of ids differs at the id's first token.
REQUEST_IDS = [3817, 5202, 9043, 1276, 6681, 2435, 7350, 4968]


def words_text(rng: random.Random, num_words: int) -> str:
    lines = []
    for i in range(0, num_words, 12):
        chunk = [rng.choice(_WORDS) for _ in range(min(12, num_words - i))]
        lines.append(" ".join(chunk).capitalize() + ".")
    return "\n".join(lines)


def system_prompt(tokenizer: Any, num_tokens: int, seed: int) -> str:
    """Instructions of about ``num_tokens`` tokens (never more)."""
    rng = random.Random(seed)
    text = f"You are the support assistant of team {seed}. Follow these rules.\n" + words_text(rng, num_tokens)
    lo, hi = 1, len(text)
    while lo < hi:  # longest prefix (in characters) that stays within num_tokens tokens
        mid = (lo + hi + 1) // 2
        if len(tokenizer.encode(text[:mid])) <= num_tokens:
            lo = mid
        else:
            hi = mid - 1
    return text[:lo].rstrip()


def questions(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [f"Question {i}: how do I {' '.join(rng.choice(_WORDS) for _ in range(8))}?" for i in range(count)]


def shared_system_log(tokenizer: Any, num_requests: int = 8, system_tokens: int = 2000) -> list[dict]:
    """OpenAI chat: one shared system prompt, a different question each time."""
    system = system_prompt(tokenizer, system_tokens, seed=1)
    return [
        {"ts": 1_700_000_000 + 10 * i, "api": "chat", "body": {
            "model": "embedded",
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": q}],
        }}
        for i, q in enumerate(questions(num_requests, seed=2))
    ]


def request_id_log(tokenizer: Any, num_requests: int = 8, system_tokens: int = 2000) -> list[dict]:
    """Anthropic messages: the same system prompt, but each starts with its own request id."""
    system = system_prompt(tokenizer, system_tokens, seed=1)
    return [
        {"ts": 1_700_000_000 + 10 * i, "api": "messages", "body": {
            "model": "embedded",
            "max_tokens": 64,
            "system": [{"type": "text", "text": f"Request id: {REQUEST_IDS[i % len(REQUEST_IDS)]}\n{system}"}],
            "messages": [{"role": "user", "content": q}],
        }}
        for i, q in enumerate(questions(num_requests, seed=2))
    ]


def interleaved_log(tokenizer: Any, num_requests: int = 16, system_tokens: int = 400) -> list[dict]:
    """Bare {"prompt": ...} bodies: four system prompts interleaved in a seeded random order."""
    systems = [system_prompt(tokenizer, system_tokens, seed=10 + k) for k in range(4)]
    order = [k % 4 for k in range(num_requests)]
    random.Random(5).shuffle(order)
    return [
        {"prompt": f"{systems[k]}\n\nUser: {q}\nAssistant:"}
        for k, q in zip(order, questions(num_requests, seed=3))
    ]


def write_jsonl(records: list[dict], path: Path) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path
