"""ClusterConfig: the scale-out options of `radixserve serve` (plain Python; no Ray import)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

RouterName = Literal["cache-aware", "pow2", "prefix-affinity"]


@dataclass(slots=True)
class ClusterConfig:
    """How `radixserve serve --replicas N` lays out engine replicas on Ray Serve."""

    replicas: int = 0
    """serve this many engine replicas behind one port on Ray Serve (0: the single-process server)"""
    router: RouterName = "cache-aware"
    """replica choice: cache-aware (KV-event prefix index weighed against load), pow2 (Ray's default
    power of two choices) or prefix-affinity (Ray Serve LLM's PrefixCacheAffinityRouter, prompt text)"""
    router_balance: float = 0.25
    """cache-aware routing: one extra in-flight request costs this fraction of a fully cached prompt
    (0: cache hits only; large: least loaded)"""
    replica_cpus: float = 1.0
    """CPU cores Ray reserves per engine replica"""
    replica_gpus: float = 0.0
    """GPUs per engine replica (1 on GPU nodes; --device cuda)"""
    ray_address: str | None = None
    """join this Ray cluster (e.g. ray://head:10001 or auto) instead of starting a local one"""
    ray_num_cpus: int | None = None
    """CPUs of the local Ray instance (default: every core)"""

    def __post_init__(self) -> None:
        if self.router not in get_args(RouterName):
            raise ValueError(f"router must be one of {list(get_args(RouterName))}, got {self.router!r}")
        if self.replicas < 0:
            raise ValueError(f"replicas must be >= 0, got {self.replicas}")
        if not 0 <= self.router_balance < math.inf:  # inf would leave no replica eligible for a new prefix
            raise ValueError(f"router_balance must be a finite number >= 0, got {self.router_balance}")

    @property
    def num_engine_replicas(self) -> int:
        """Replicas the engine deployment gets: a Serve config that names none still serves one."""
        return max(self.replicas, 1)

    def replica_resources(self) -> dict[str, float]:
        """Ray resources one engine replica reserves."""
        resources = {"num_cpus": self.replica_cpus}
        if self.replica_gpus:
            resources["num_gpus"] = self.replica_gpus
        return resources
