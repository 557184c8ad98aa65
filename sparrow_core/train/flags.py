"""Command-line flags from a trainer's config dataclass: one flag per field, so a new field is a new
flag with its default, and the two trainers' CLIs read the same way."""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence


def add_config_flags(parser: argparse.ArgumentParser, config_cls: type, skip: Sequence[str] = ("out",),
                     choices: Mapping[str, Sequence[str]] | None = None,
                     helps: Mapping[str, str] | None = None) -> None:
    """--field-name for every field of `config_cls` but `skip`: a choice where `choices` names one,
    --x / --no-x for booleans, else the default's type (a None default takes a string)."""
    choices, helps = choices or {}, helps or {}
    for name, f in config_cls.__dataclass_fields__.items():
        if name in skip:
            continue
        flag = f"--{name.replace('_', '-')}"
        if name in choices:
            parser.add_argument(flag, choices=choices[name], default=f.default, help=helps.get(name))
        elif isinstance(f.default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=helps.get(name))
        elif f.default is None:
            parser.add_argument(flag, default=None, help=helps.get(name))
        else:
            parser.add_argument(flag, type=type(f.default), default=f.default, help=helps.get(name))
