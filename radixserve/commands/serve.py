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
    g.add_argument("--namespace-from-api-key", action="store_true",
                   help="give each API key its own prefix-cache namespace, so tenants never share cached blocks")
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
    g.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    add_engine_args(p)
    p.set_defaults(func=run)


def server_config_from_args(args: argparse.Namespace):
    """The ServerConfig the `serve` options describe."""
    from radixserve.server.config import ServerConfig

    return ServerConfig(
        host=args.host,
        port=args.port,
        served_model_name=args.served_model_name,
        api_keys=list(args.api_keys),
        namespace_from_api_key=args.namespace_from_api_key,
        min_cacheable_tokens=args.min_cacheable_tokens,
        max_request_bytes=args.max_request_bytes,
        body_read_timeout=args.body_read_timeout,
        shutdown_timeout=args.shutdown_timeout,
        cache_ttl_scale=args.cache_ttl_scale,
        log_level=args.log_level,
        request_log=args.request_log,
    )


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from radixserve.server import create_app
    from radixserve.server.http_protocol import JSONErrorH11Protocol

    config = server_config_from_args(args)
    app = create_app(engine_config_from_args(args), config)
    # timeout_graceful_shutdown bounds SIGTERM: without it uvicorn waits for every open
    # request, however long (a queued request, a client that never reads).
    uvicorn.run(app, host=config.host, port=config.port, log_level=config.log_level,
                timeout_graceful_shutdown=config.shutdown_timeout, http=JSONErrorH11Protocol)
    return 0
