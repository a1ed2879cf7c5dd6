"""Typed configs: ``load_config(StableConfig, path, overrides)``; see docs/config.md."""
from .core import ConfigError, apply_overrides, build, load_config, read_yaml, to_dict  # noqa: F401
from .pretrain import PretrainConfig  # noqa: F401
from .stable import StableConfig  # noqa: F401
