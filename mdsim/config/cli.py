"""Command-line handling shared by the entry points: the original's flags map onto config keys,
``--set key.sub=value`` overrides anything; everything is validated before work starts."""
from __future__ import annotations

import argparse
import sys
from typing import Dict, List

from .core import ConfigError, load_config


def add_config_args(parser: argparse.ArgumentParser, flags: Dict[str, str]) -> None:
    """Add ``--config-yml``, ``--set`` and one flag per entry of ``flags`` (flag → dotted key)."""
    parser.add_argument("--config-yml", "--config_yml", dest="config_yml", default=None,
                        help="YAML config (may `includes` a parent)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set optim.max_epochs=2 (repeatable)")
    for flag, key in flags.items():
        parser.add_argument(flag, dest="flag_" + key.replace(".", "__"), default=None, metavar="VALUE",
                            help=f"sets config key `{key}`")


def overrides_from_args(args, flags: Dict[str, str]) -> List:
    out = []
    for key in flags.values():
        v = getattr(args, "flag_" + key.replace(".", "__"))
        if v is not None:
            from .core import parse_override
            out.append((key, parse_override(f"x={v}")[1]))
    return out + list(args.overrides)


def config_from_args(cls, args, flags: Dict[str, str]):
    """Load and validate; on error print one line and exit with status 2."""
    try:
        return load_config(cls, args.config_yml, overrides_from_args(args, flags))
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        raise SystemExit(2)
