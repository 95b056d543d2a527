"""Shared scopes: prefixes an operator publishes for every tenant to read, and nobody else writes.

A scope is a token prefix (whole blocks) kept in a namespace of its own. A request whose prompt
starts with a published prefix reads the scope's blocks, and everything after the prefix lives
in a *continuation* namespace derived from the request's own namespace and the scope: a tree
rooted right after the shared part, holding only the suffix. So tenant A and tenant B both read
the shared system prompt, while A's questions after it stay in A's namespace (B's continuation
root is another root). Only the publishing request (LLMEngine.publish_shared_prefix, an operator
action) writes into a scope: a tenant request's inserts go to its continuation namespace.

Keys: every tenant key is ``model_key + "\\x00" + namespace``; scope and continuation keys start
with tags no model key can equal ("shared\\x00", "shared-after\\x00"), whatever a tenant puts in
its namespace (cache_salt), so no request can forge a key that lands in a scope.
"""

from __future__ import annotations

import hashlib
import re
from array import array
from collections.abc import Sequence
from dataclasses import dataclass

_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


@dataclass(slots=True, frozen=True)
class SharedScope:
    """One published prefix."""

    name: str
    token_ids: tuple[int, ...]  # whole blocks

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def identity(self) -> str:
        """Name and content: republishing other tokens under the same name is another scope, so
        suffixes computed after the old prefix are never read after the new one."""
        digest = hashlib.blake2b(array("I", self.token_ids).tobytes(), digest_size=12).hexdigest()
        return f"{self.name}:{digest}"


class SharedScopes:
    """The published prefixes of one engine; the longest one a prompt starts with is used."""

    def __init__(self, model_key: str) -> None:
        self.model_key = model_key
        self._scopes: dict[str, SharedScope] = {}

    def __len__(self) -> int:
        return len(self._scopes)

    def publish(self, name: str, token_ids: Sequence[int]) -> SharedScope:
        """Register (or replace) scope ``name`` (letters, digits, ``_.-``); whole blocks of tokens."""
        if not _NAME.match(name):
            raise ValueError(f"a shared scope's name is 1-64 letters, digits, '_', '.' or '-', got {name!r}")
        scope = self._scopes[name] = SharedScope(name, tuple(token_ids))
        return scope

    def withdraw(self, name: str) -> SharedScope | None:
        return self._scopes.pop(name, None)

    def get(self, name: str) -> SharedScope | None:
        return self._scopes.get(name)

    def find(self, token_ids: Sequence[int], max_tokens: int) -> SharedScope | None:
        """The longest scope of at most ``max_tokens`` tokens that ``token_ids`` start with."""
        best = None
        for scope in self._scopes.values():
            n = scope.num_tokens
            if 0 < n <= max_tokens and (best is None or n > best.num_tokens) \
                    and tuple(token_ids[:n]) == scope.token_ids:
                best = scope
        return best

    def scope_key(self, scope: SharedScope) -> str:
        """The tree namespace holding a scope's blocks."""
        return f"shared\x00{self.model_key}\x00{scope.identity}"

    def continuation_key(self, scope: SharedScope, namespace: str) -> str:
        """The tree namespace holding what ``namespace``'s requests put after ``scope``."""
        return f"shared-after\x00{self.model_key}\x00{scope.identity}\x00{namespace}"
