"""Command-line options shared by every subcommand that builds an engine.

The flags are generated from the config dataclasses (radixserve/config.py): their names from the
field names, their defaults from the field defaults, their help from the field docstrings.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing

from radixserve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig, field_docs

_SECTIONS = (("model", ModelConfig), ("cache", CacheConfig), ("scheduler", SchedulerConfig))
# Flags whose name is not the field's (a bool that defaults to True gets a --no- flag).
_FLAG_NAMES = {"source": "--model", "enable_prefix_caching": "--no-prefix-caching", "kernel_warmup": "--no-kernel-warmup",
               "cpu_packed_weights": "--no-cpu-packed-weights", "cascade_attention": "--no-cascade-attention"}
# Fields without a flag: the dummy-weight seed (subcommands have their own --seed) and progress bars.
_NO_FLAG = {"seed", "show_progress"}


def _flags(cls: type) -> list[tuple[dataclasses.Field, str, object]]:
    hints = typing.get_type_hints(cls)
    return [(f, _FLAG_NAMES.get(f.name, "--" + f.name.replace("_", "-")), hints[f.name])
            for f in dataclasses.fields(cls) if f.name not in _NO_FLAG]  # fmt: skip


def _dest(flag: str) -> str:
    return flag.removeprefix("--").replace("-", "_")


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model and engine")
    for _, cls in _SECTIONS:
        docs = field_docs(cls)
        for f, flag, hint in _flags(cls):
            if hint is bool:  # a switch away from the default
                doc = docs.get(f.name, "")
                g.add_argument(flag, action="store_true", help=f"turn off {doc}" if f.default else doc)
                continue
            args = [a for a in typing.get_args(hint) if a is not type(None)] if _is_union(hint) else [hint]
            choices = list(typing.get_args(args[0])) if typing.get_origin(args[0]) is typing.Literal else None
            kind = type(choices[0]) if choices else args[0]
            g.add_argument(flag, type=kind, default=f.default, choices=choices, help=docs.get(f.name))


def _is_union(hint: object) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType)


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    parts = {}
    for name, cls in _SECTIONS:
        values = {}
        for f, flag, _ in _flags(cls):
            value = getattr(args, _dest(flag))
            values[f.name] = (not value) if f.default is True else value
        parts[name] = cls(**values)
    return EngineConfig(**parts)
