"""API keys and tenancy: who is calling, what they may do, and which prefix-cache namespace
their requests use.

Three kinds of key, all optional:
  - API keys (--api-key) call the model and manage their own named caches;
  - admin keys (--admin-key) are API keys that may also run operator actions (reset the prefix
    cache) and read /metrics;
  - metrics keys (--metrics-key) only read /metrics; giving one puts /metrics behind a key.
With no API or admin key configured the server is open: every caller is the same anonymous
tenant, and operator routes are open too (bind to loopback, as the default --host does).

Namespaces keep tenants apart: the radix tree has one root per namespace, so a request can
only hit blocks computed under the same namespace. A request's namespace combines
  - the API key it authenticated with, hashed, when `namespace_from_api_key` is on, and
  - the `cache_salt` field of the request, when given.
Combining (rather than letting the salt replace the key) means a client cannot reach another
key's cache by guessing its salt. Ownership (of named caches) follows the key in every mode,
isolated or shared: `Tenant.owner` is the key's hash whenever keys are configured.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass, field

from fastapi import Request

from radixserve.request import CachePolicy
from radixserve.server.errors import APIError

# How much caching each policy allows, to pick the stricter of two.
_POLICY_RANK = {CachePolicy.NONE: 0, CachePolicy.READ_ONLY: 1, CachePolicy.READ_WRITE: 2}


def stricter(a: CachePolicy, b: CachePolicy) -> CachePolicy:
    """The policy that caches less."""
    return a if _POLICY_RANK[a] <= _POLICY_RANK[b] else b


@dataclass(frozen=True, slots=True)
class Tenant:
    """The caller of one request."""

    key_namespace: str = ""  # derived from the API key ("" when keys do not select namespaces)
    owner: str = ""  # owns named caches: the key's hash whenever keys are configured ("" when open)
    is_admin: bool = False
    cache_policy: CachePolicy = CachePolicy.READ_WRITE  # the most caching this key's requests get

    def namespace(self, cache_salt: str | None = None) -> str:
        parts = []
        if self.key_namespace:
            parts.append(f"key:{self.key_namespace}")
        if cache_salt:
            parts.append(f"salt:{cache_salt}")
        return "|".join(parts)

    def cache_policy_for(self, requested: str | None) -> CachePolicy:
        """A request's effective cache policy: what it asked for, never more than its key allows."""
        if requested is None:
            return self.cache_policy
        try:
            policy = CachePolicy(requested)
        except ValueError:
            raise APIError(
                400, f"cache_policy must be one of {[p.value for p in CachePolicy]}, got {requested!r}",
                param="cache_policy",
            ) from None
        return stricter(policy, self.cache_policy)


def key_id(key: str) -> str:
    """A stable, non-reversible id for a key (what namespaces and owners are made of)."""
    return hashlib.sha256(key.encode()).hexdigest()[:24]


@dataclass(slots=True)
class _Keys:
    """A set of keys, compared in constant time against every one of them."""

    keys: list[bytes] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.keys)

    def __contains__(self, key: str) -> bool:
        matched = False
        for known in self.keys:  # no early exit: timing reveals nothing about which key matched
            matched |= hmac.compare_digest(key.encode(), known)
        return matched


class Authenticator:
    """Checks the key of a request (if keys are configured) and derives its Tenant.

    OpenAI clients send `Authorization: Bearer <key>`, Anthropic clients `x-api-key: <key>`;
    both headers are accepted on every route, so either client works against either API.
    """

    def __init__(
        self,
        api_keys: list[str],
        namespace_from_api_key: bool,
        admin_keys: list[str] | None = None,
        metrics_keys: list[str] | None = None,
        key_cache_policies: dict[str, CachePolicy] | None = None,
        default_cache_policy: CachePolicy = CachePolicy.READ_WRITE,
    ) -> None:
        self._admin = _Keys([k.encode() for k in admin_keys or []])
        self._api = _Keys([k.encode() for k in api_keys] + self._admin.keys)  # admin keys are API keys
        self._metrics = _Keys([k.encode() for k in metrics_keys or []] + self._admin.keys)
        self._policies = {key_id(k): CachePolicy(p) for k, p in (key_cache_policies or {}).items()}
        self.default_cache_policy = CachePolicy(default_cache_policy)
        self.namespace_from_api_key = namespace_from_api_key
        self.metrics_protected = bool(metrics_keys)

    @property
    def enabled(self) -> bool:
        return bool(self._api)

    @property
    def isolated(self) -> bool:
        """True when each key has its own prefix-cache namespace (tenants cannot probe each other)."""
        return self.enabled and self.namespace_from_api_key

    def authenticate(self, request: Request) -> Tenant:
        """The caller, or 401 when keys are configured and none (or a wrong one) was sent."""
        key = _presented_key(request)
        if not self._api:
            return Tenant(cache_policy=self.default_cache_policy)
        key = self._require(key, self._api)
        kid = key_id(key)
        return Tenant(
            key_namespace=kid if self.namespace_from_api_key else "",
            owner=kid,
            is_admin=key in self._admin,
            cache_policy=self._policies.get(kid, self.default_cache_policy),
        )

    def authenticate_admin(self, request: Request) -> Tenant:
        """An operator action: needs an admin key when any key is configured (401 without a
        key, 403 with a tenant's key). With no keys configured the server is open, and so is this."""
        tenant = self.authenticate(request)
        if self._api and not tenant.is_admin:
            raise APIError(403, "this is an operator action: it needs an admin key (--admin-key)",
                           code="permission_denied")
        return tenant

    def authenticate_metrics(self, request: Request) -> None:
        """/metrics: open unless metrics keys are configured; then a metrics or admin key."""
        if self.metrics_protected:
            self._require(_presented_key(request), self._metrics)

    @staticmethod
    def _require(key: str | None, keys: _Keys) -> str:
        if key is None:
            raise APIError(
                401,
                "missing API key: send it as 'Authorization: Bearer <key>' or 'x-api-key: <key>'",
                code="invalid_api_key",
            )
        if key not in keys:
            raise APIError(401, "invalid API key", code="invalid_api_key")
        return key


def _presented_key(request: Request) -> str | None:
    return presented_key(request.headers)


def presented_key(headers: Mapping[str, str]) -> str | None:
    """The API key a request presents: x-api-key (Anthropic's header), else a Bearer token.
    (The cluster ingress reads it with this too, to route in the namespace the replica will use.)"""
    header = headers.get("x-api-key")
    if header:
        return header.strip()
    auth = headers.get("authorization", "")
    scheme, _, value = auth.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return None
