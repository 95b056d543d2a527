"""The routed endpoint's /metrics: each replica's page labelled by replica, plus the router's."""

import re
from typing import Any

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?(\s.*)$")


def label_metrics(text: str, replica_id: str) -> str:
    """Add replica="<id>" to every sample of a Prometheus text page (comments pass through once)."""
    out = []
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if line.startswith("#") or match is None:
            out.append(line)
            continue
        name, labels, rest = match.groups()
        inner = labels[1:-1] + "," if labels and labels != "{}" else ""
        out.append(f'{name}{{{inner}replica="{replica_id}"}}{rest}')
    return "\n".join(out) + "\n"


def cluster_metrics(stats: dict[str, Any]) -> str:
    """The router and index metrics, in Prometheus text format."""
    routers = stats["routers"].values()
    prefix = sum(r.get("decisions_prefix", 0) for r in routers)
    balance = sum(r.get("decisions_balance", 0) for r in routers)
    routing_s = sum(r.get("routing_seconds_total", 0.0) for r in routers)
    lines = [
        "# HELP radixserve_router_decisions_total requests routed, by reason (prefix: to the replica holding "
        "the longest prefix; balance: least loaded)",
        "# TYPE radixserve_router_decisions_total counter",
        f'radixserve_router_decisions_total{{decision="prefix"}} {prefix}',
        f'radixserve_router_decisions_total{{decision="balance"}} {balance}',
        "# HELP radixserve_router_seconds_total time spent choosing replicas",
        "# TYPE radixserve_router_seconds_total counter",
        f"radixserve_router_seconds_total {routing_s}",
        "# HELP radixserve_router_index_blocks distinct KV blocks in the cluster prefix index",
        "# TYPE radixserve_router_index_blocks gauge",
        f"radixserve_router_index_blocks {stats['index_keys']}",
        f"radixserve_router_index_entries {stats['index_entries']}",
        "# HELP radixserve_kv_event_lag_seconds age of the latest KV event batch when it was applied",
        "# TYPE radixserve_kv_event_lag_seconds gauge",
        f"radixserve_kv_event_lag_seconds {stats['event_lag_s']}",
        f"radixserve_cluster_named_caches {stats['named_caches']}",
    ]
    for replica_id, info in sorted(stats["replicas"].items()):
        lines.append(f'radixserve_replica_indexed_blocks{{replica="{replica_id}"}} {info["blocks"]}')
        lines.append(f'radixserve_replica_unfinished_requests{{replica="{replica_id}"}} {info["unfinished_requests"]}')
    return "\n".join(lines) + "\n"
