"""`radixserve serve`: the HTTP server (OpenAI + Anthropic APIs, named caches, /metrics)."""

from __future__ import annotations

import argparse

from radixserve.commands.common import add_engine_args, engine_config_from_args


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help="serve the model over HTTP (OpenAI- and Anthropic-compatible)")
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--served-model-name", default=None,
                   help="the model name clients use (default: the model's id; 'embedded' and the id also work)")
    g.add_argument("--api-key", action="append", default=[], dest="api_keys",
                   help="require this key (Bearer or x-api-key); repeat for several keys")
    g.add_argument("--cache-isolation", choices=["shared", "per-key"], default=None,
                   help="per-key: each API key gets its own prefix-cache namespace, so tenants can neither read "
                        "nor probe (by timing or cached_tokens) each other's prompts; shared (the default): one "
                        "cache for every key, faster when tenants send the same prefixes (see docs/security.md)")
    g.add_argument("--namespace-from-api-key", action="store_true",
                   help="same as --cache-isolation per-key")
    g.add_argument("--admin-key", action="append", default=[], dest="admin_keys",
                   help="an API key that may also run operator actions (POST /reset_prefix_cache) and read "
                        "/metrics; repeatable. With keys configured, operator actions need one")
    g.add_argument("--metrics-key", action="append", default=[], dest="metrics_keys",
                   help="put /metrics behind a key: this key (or an admin key) reads it; repeatable "
                        "(default: /metrics is open, as Prometheus scrapers expect)")
    g.add_argument("--default-cache-policy", choices=["read_write", "read_only", "none"], default="read_write",
                   help="the most caching a request gets: read_write (default), read_only (reads cached prefixes, "
                        "stores nothing) or none (neither); a request's cache_policy can only tighten it")
    g.add_argument("--key-cache-policy", action="append", default=[], metavar="KEY=POLICY",
                   help="the cache policy ceiling of one API key (e.g. sk-hr=none); repeatable")
    g.add_argument("--min-cacheable-tokens", type=int, default=1024,
                   help="cache_control breakpoints and named caches shorter than this are not pinned")
    g.add_argument("--max-request-bytes", type=int, default=8 * 1024 * 1024,
                   help="larger request bodies are refused with 413")
    g.add_argument("--body-read-timeout", type=float, default=30.0,
                   help="seconds a request body may take to arrive (a slower or truncated one gets 408)")
    g.add_argument("--shutdown-timeout", type=float, default=10.0,
                   help="on SIGTERM, seconds running requests get to finish before they are ended")
    g.add_argument("--cache-ttl-scale", type=float, default=1.0,
                   help="testing knob: multiply cache_control TTLs (5m, 1h) by this factor")
    g.add_argument("--request-log", metavar="PATH", default=None,
                   help="append each request body (with a timestamp) to this JSONL file for `radixserve advise`; "
                        "off by default (prompts may be sensitive)")
    g.add_argument("--state-dir", metavar="PATH", default=None,
                   help="save named caches and unexpired cache_control pins in PATH/server-state.json and re-create "
                        "them at start (their KV recomputed in the background); off by default (the file holds "
                        "prompt text). One server per directory")
    g.add_argument("--max-named-caches", type=int, default=1024,
                   help="live named caches this server keeps; creating more gets 429 (default 1024)")
    g.add_argument("--cache-report", action="store_true",
                   help="every response carries usage.cache_report (cached tokens and one reason for the rest); "
                        "without it a request asks with \"cache_report\": true (see docs/security.md)")
    g.add_argument("--shared-prefix", action="append", default=[], metavar="FILE", dest="shared_prefix_files",
                   help="publish FILE's text as a shared system prompt at startup: every tenant whose chat starts "
                        "with it reads its cached blocks, what follows stays in the tenant's own namespace; "
                        "repeatable (admins can also POST /v1/shared_prefixes)")
    g.add_argument("--probe-rate-limit", type=float, default=None, metavar="PER_MINUTE",
                   help="per API key, at most this many requests a minute that read the prefix cache (each is a "
                        "probe of it); over it: 429 with Retry-After. Default: no limit")
    g.add_argument("--probe-burst", type=int, default=None,
                   help="with --probe-rate-limit: how many such requests a key may send at once (default: a "
                        "minute's worth)")
    g.add_argument("--shared-ttft-floor", type=float, default=0.0, metavar="SECONDS",
                   help="requests that read a prefix cache shared across keys (not --cache-isolation per-key) "
                        "get their first token no sooner than this: hits and quicker misses look alike. Default 0")
    g.add_argument("--engine-process", choices=["auto", "on", "off"], default="auto",
                   help="run the engine core in a process of its own (on), fed over ZeroMQ, so HTTP handling and "
                        "the step loop do not share one interpreter lock; off: on a thread of the server process; "
                        "auto (default): on (measured faster on CPU and GPU; see docs/internals.md)")
    g.add_argument("--engine-spin-count", type=int, default=0, metavar="N",
                   help="CPU, engine process: OpenMP busy-wait iterations (GOMP_SPINCOUNT) before a thread of the "
                        "core sleeps. 0 (default): sleep at once, safe on shared cores; ~10000 on cores the server "
                        "has to itself: a cached-prefix TTFT ~20%% lower (docs/benchmarks.md)")
    g.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    _add_cluster_args(p)
    add_engine_args(p)
    p.set_defaults(func=run)


def _add_cluster_args(p: argparse.ArgumentParser) -> None:
    """Scale-out flags, from ClusterConfig's fields (radixserve/cluster/config.py imports no Ray)."""
    import dataclasses
    import typing

    from radixserve.cluster.config import ClusterConfig
    from radixserve.config import field_docs

    g = p.add_argument_group("scale-out (Ray Serve; pip install radixserve[cluster])")
    docs = field_docs(ClusterConfig)
    hints = typing.get_type_hints(ClusterConfig)
    for f in dataclasses.fields(ClusterConfig):
        hint = hints[f.name]
        kwargs: dict = {"default": f.default, "help": docs.get(f.name, "")}
        if typing.get_origin(hint) is typing.Literal:
            kwargs["choices"] = list(typing.get_args(hint))
        else:
            base = next((t for t in typing.get_args(hint) if t is not type(None)), hint)
            kwargs["type"] = base
        p_flag = "--" + f.name.replace("_", "-")
        g.add_argument(p_flag, **kwargs)


def server_config_from_args(args: argparse.Namespace):
    """The ServerConfig the `serve` options describe."""
    from radixserve.server.config import ServerConfig

    return ServerConfig(
        host=args.host,
        port=args.port,
        served_model_name=args.served_model_name,
        api_keys=list(args.api_keys),
        namespace_from_api_key=args.namespace_from_api_key or args.cache_isolation == "per-key",
        admin_keys=list(args.admin_keys),
        metrics_keys=list(args.metrics_keys),
        default_cache_policy=args.default_cache_policy,
        key_cache_policies=_key_policies(args.key_cache_policy),
        min_cacheable_tokens=args.min_cacheable_tokens,
        max_request_bytes=args.max_request_bytes,
        body_read_timeout=args.body_read_timeout,
        shutdown_timeout=args.shutdown_timeout,
        cache_ttl_scale=args.cache_ttl_scale,
        log_level=args.log_level,
        request_log=args.request_log,
        state_dir=args.state_dir,
        max_named_caches=args.max_named_caches,
        cache_report=args.cache_report,
        shared_prefix_files=list(args.shared_prefix_files),
        probe_rate_limit=args.probe_rate_limit,
        probe_burst=args.probe_burst,
        shared_ttft_floor=args.shared_ttft_floor,
        engine_process=args.engine_process,
        engine_spin_count=args.engine_spin_count,
    )


def _key_policies(items: list[str]) -> dict[str, str]:
    policies = {}
    for item in items:
        key, sep, policy = item.rpartition("=")
        if not sep or not key:
            raise ValueError(f"--key-cache-policy takes KEY=POLICY, got {item!r}")
        policies[key] = policy
    return policies


def run(args: argparse.Namespace) -> int:
    if args.replicas:
        from radixserve.cluster.launch import run as run_cluster  # imports Ray; a plain serve never does

        return run_cluster(args)
    import logging

    import uvicorn

    from radixserve.server import create_app
    from radixserve.server.http_protocol import JSONErrorH11Protocol

    if args.namespace_from_api_key and args.cache_isolation == "shared":
        raise ValueError("--namespace-from-api-key means --cache-isolation per-key, not shared")
    config = server_config_from_args(args)
    # the startup lines (which cache mode runs, who may reset it) in uvicorn's format
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s:     %(message)s"))
    logger = logging.getLogger("radixserve")
    logger.addHandler(handler)
    logger.setLevel(config.log_level.upper())
    app = create_app(engine_config_from_args(args), config)
    # timeout_graceful_shutdown bounds SIGTERM: without it uvicorn waits for every open
    # request, however long (a queued request, a client that never reads).
    uvicorn.run(app, host=config.host, port=config.port, log_level=config.log_level,
                timeout_graceful_shutdown=config.shutdown_timeout, http=JSONErrorH11Protocol)
    return 0
