"""`radixserve serve --replicas N`: start (or join) Ray, deploy the application, wait.

Ray Serve does the rest: it places the replicas, health-checks them and restarts one that dies.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import threading
import time
from typing import Any

from radixserve.cluster.config import ClusterConfig

log = logging.getLogger("radixserve")


def cluster_config_from_args(args: argparse.Namespace) -> ClusterConfig:
    """The ClusterConfig the scale-out flags describe (each flag is named after its field)."""
    return ClusterConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ClusterConfig)})


def build_from_args(args: argparse.Namespace, with_ingress: bool = True):
    """The Serve application: with its Ingress deployment (behind Serve's HTTP proxy), or the
    engine deployment alone (for http_ingress_app in this process)."""
    from radixserve.cluster.deployments import build_app, build_engine_app
    from radixserve.commands.common import engine_config_from_args
    from radixserve.commands.serve import server_config_from_args

    engine_config = engine_config_from_args(args)
    engine_config.model.show_progress = False  # replicas log to files; bars would be noise
    build = build_app if with_ingress else build_engine_app
    return build(engine_config, server_config_from_args(args), cluster_config_from_args(args))


def app_from_options(options: dict[str, Any]):
    """The application from `radixserve serve` options given as a dict (a Serve config's args:
    {"replicas": 2, "model": "embedded", "replica_gpus": 1, ...})."""
    from radixserve.cli import build_parser

    argv = ["serve"]
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value is False or value is None:
            continue
        elif isinstance(value, list):
            for item in value:
                argv += [flag, str(item)]
        else:
            argv += [flag, str(value)]
    return build_from_args(build_parser().parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """Ray + the engine deployment; the ingress is this process's own HTTP server
    (http_ingress_app: one Ray hop per request, not Serve's proxy and an ingress actor)."""
    import ray
    import uvicorn
    from ray import serve

    from radixserve.cluster.deployments import http_ingress_app
    from radixserve.commands.serve import server_config_from_args

    cluster = cluster_config_from_args(args)
    started = time.monotonic()
    print(f"radixserve: starting Ray ({cluster.ray_address or 'local'}) ...", flush=True)
    if cluster.ray_address:
        ray.init(address=cluster.ray_address, namespace="radixserve")
    else:
        ray.init(num_cpus=cluster.ray_num_cpus, namespace="radixserve", include_dashboard=False)
    serve.start(proxy_location="Disabled")
    app = build_from_args(args, with_ingress=False)
    print(f"radixserve: deploying {cluster.replicas} engine replica(s), router {cluster.router} "
          f"({time.monotonic() - started:.0f}s) ...", flush=True)
    done = threading.Event()
    threading.Thread(target=_report_progress, args=(done, started), daemon=True).start()
    try:
        engine = serve.run(app, name="radixserve", route_prefix=None, blocking=False)  # once every replica is up
    finally:
        done.set()
    print(f"radixserve: ready on http://{args.host}:{args.port} with {cluster.replicas} replica(s) "
          f"({time.monotonic() - started:.0f}s); Ctrl-C stops", flush=True)
    try:
        from radixserve.server.http_protocol import JSONErrorH11Protocol

        config = server_config_from_args(args)
        uvicorn.run(http_ingress_app(engine, config), host=args.host, port=args.port, log_level=config.log_level,
                    timeout_graceful_shutdown=config.shutdown_timeout, http=JSONErrorH11Protocol)
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0


def _report_progress(done: threading.Event, started: float, interval: float = 5.0) -> None:
    """While the application deploys: one line per interval with each deployment's replica states
    (model loading takes a while; a silent terminal looks hung)."""
    from ray import serve

    while not done.wait(interval):
        try:
            app = serve.status().applications.get("radixserve")
            if app is None:
                continue
            states = "; ".join(f"{name}: " + ", ".join(f"{n} {state.lower()}" for state, n in d.replica_states.items())
                               for name, d in app.deployments.items())
            print(f"radixserve:   {time.monotonic() - started:.0f}s {states}", flush=True)
        except Exception:  # noqa: BLE001 - progress lines are best effort
            continue
