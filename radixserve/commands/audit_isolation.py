"""`radixserve audit-isolation`: does a server's prefix cache leak one tenant's prompts to another?"""

from __future__ import annotations

import argparse
import json
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    from dataclasses import fields

    from radixserve.security.audit import AuditConfig

    default = {f.name: f.default for f in fields(AuditConfig)}  # one source of defaults
    p = subparsers.add_parser(
        "audit-isolation",
        help="probe a live OpenAI-compatible server for cross-tenant prefix-cache leaks (timing and cached_tokens)",
        description="Tenant A plants random prompts; tenant B times probes that would hit them against probes "
                    "that cannot hit; a two-sample KS test on time to first token says whether B can tell. "
                    "Exit status: 0 no leak found, 1 leak found, 2 error.",
    )
    p.add_argument("--base-url", required=True, help="the server, e.g. http://127.0.0.1:8000 (with or without /v1)")
    p.add_argument("--key", action="append", default=[], dest="keys", metavar="KEY",
                   help="an API key: give two, the victim's then the attacker's (one: both tenants use it; "
                        "none: a server without keys)")
    p.add_argument("--model", default=None, help="the model to send (default: the first one /v1/models lists)")
    p.add_argument("--api", choices=["chat", "completions"], default=default["api"])
    p.add_argument("--trials", type=int, default=default["trials"],
                   help="planted prefixes = hit probes = miss probes (default %(default)s)")
    p.add_argument("--prompt-tokens", type=int, default=default["prompt_tokens"],
                   help="length of each random prompt (default %(default)s; longer separates hits better on fast "
                        "servers)")
    p.add_argument("--warmup", type=int, default=default["warmup"],
                   help="unmeasured trials first (default %(default)s)")
    p.add_argument("--alpha", type=float, default=default["alpha"],
                   help="significance level: the chance of calling an isolated server leaky (default %(default)s)")
    p.add_argument("--seed", type=int, default=None, help="fix the random prompts (default: fresh randomness)")
    p.add_argument("--timeout", type=float, default=default["timeout"], help="seconds per request")
    p.add_argument("--json", action="store_true", help="print the result as JSON (every probe included)")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import httpx

    from radixserve.security.audit import AuditConfig, run_audit

    if len(args.keys) > 2:
        raise ValueError("give at most two --key values: the victim's and the attacker's")
    keys = list(args.keys) or [None]
    config = AuditConfig(
        base_url=args.base_url, victim_key=keys[0], attacker_key=keys[-1], model=args.model, api=args.api,
        trials=args.trials, prompt_tokens=args.prompt_tokens, warmup=args.warmup, alpha=args.alpha,
        seed=args.seed, timeout=args.timeout,
    )
    if len(args.keys) < 2:
        print("note: fewer than two keys: both tenants send the same key (or none), which tests a shared cache",
              file=sys.stderr)

    def progress(done: int, total: int) -> None:
        if not args.quiet:
            print(f"\r  trial {done}/{total}", end="" if done < total else "\n", file=sys.stderr, flush=True)

    try:
        result = run_audit(config, progress)
    except (RuntimeError, OSError, httpx.HTTPError) as e:  # report, exit 2
        raise ValueError(f"the audit could not run: {e}") from None
    print(json.dumps(result.to_json(), indent=2) if args.json else result.report())
    return 1 if result.leak else 0
