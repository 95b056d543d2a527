"""API keys and tenancy: who is calling, and which prefix-cache namespace their requests use.

Namespaces keep tenants apart: the radix tree has one root per namespace, so a request can
only hit blocks computed under the same namespace. A request's namespace combines
  - the API key it authenticated with, hashed, when `namespace_from_api_key` is on, and
  - the `cache_salt` field of the request, when given.
Combining (rather than letting the salt replace the key) means a client cannot reach another
key's cache by guessing its salt.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from fastapi import Request

from radixserve.server.errors import APIError


@dataclass(frozen=True, slots=True)
class Tenant:
    """The caller of one request."""

    key_namespace: str = ""  # derived from the API key ("" when keys do not select namespaces)

    def namespace(self, cache_salt: str | None = None) -> str:
        parts = []
        if self.key_namespace:
            parts.append(f"key:{self.key_namespace}")
        if cache_salt:
            parts.append(f"salt:{cache_salt}")
        return "|".join(parts)


class Authenticator:
    """Checks the API key of a request (if keys are configured) and derives its Tenant.

    OpenAI clients send `Authorization: Bearer <key>`, Anthropic clients `x-api-key: <key>`;
    both headers are accepted on every route, so either client works against either API.
    """

    def __init__(self, api_keys: list[str], namespace_from_api_key: bool) -> None:
        self._keys = [k.encode() for k in api_keys]
        self.namespace_from_api_key = namespace_from_api_key

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def authenticate(self, request: Request) -> Tenant:
        key = _presented_key(request)
        if self._keys:
            if key is None:
                raise APIError(
                    401,
                    "missing API key: send it as 'Authorization: Bearer <key>' or 'x-api-key: <key>'",
                    code="invalid_api_key",
                )
            # compare against every key, in constant time, so timing reveals nothing
            matched = False
            for known in self._keys:
                matched |= hmac.compare_digest(key.encode(), known)
            if not matched:
                raise APIError(401, "invalid API key", code="invalid_api_key")
        if self.namespace_from_api_key and key:
            return Tenant(key_namespace=hashlib.sha256(key.encode()).hexdigest()[:24])
        return Tenant()


def _presented_key(request: Request) -> str | None:
    header = request.headers.get("x-api-key")
    if header:
        return header.strip()
    auth = request.headers.get("authorization", "")
    scheme, _, value = auth.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return None
