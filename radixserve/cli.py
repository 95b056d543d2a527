"""The `radixserve` command. Subcommands live in radixserve/commands/, one module each."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

from radixserve.errors import RadixServeError

_COMMANDS = ("generate", "serve", "bench", "advise", "audit_isolation")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="radixserve", description="LLM inference with automatic prefix caching")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in _COMMANDS:
        module_name = f"radixserve.commands.{name}"
        if importlib.util.find_spec(module_name) is not None:
            importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except (RadixServeError, ValueError) as e:
        print(f"radixserve: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
