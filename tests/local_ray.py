"""A local Ray for the cluster tests, started from the pytest process itself."""

from __future__ import annotations

import warnings


def start_local_ray(namespace: str) -> None:
    """ray.init with 2 CPUs and no dashboard; tried a second time when Ray's head never
    comes up. Ray forks its GCS server from this process with a Python preexec_fn, and by then
    the process runs many threads (earlier tests' engines, gRPC's): a child forked from it can
    hang before exec. That is the likely cause of the one failure seen (CI, 2026-12-01: "Timed out
    waiting for file .../gcs_server_port_...", no GCS log written). Only starting Ray is retried,
    nothing a test asserts."""
    import ray

    options = dict(num_cpus=2, namespace=namespace, include_dashboard=False, log_to_driver=False)
    try:
        ray.init(**options)
    except (RuntimeError, TimeoutError) as e:  # the GCS port file, or the node, never appeared
        warnings.warn(f"Ray's head did not start ({e}); starting it again", stacklevel=2)
        ray.shutdown()
        ray.init(**options)
