"""Scale-out: engine replicas on Ray Serve, KV events, a cache-aware request router.

Only ``deployments``, ``router``, ``shared_state`` and ``launch`` import Ray; ``kv_events`` and
``prefix_index`` are plain Python (unit-tested without Ray). A plain ``radixserve serve`` never
imports this package.
"""
