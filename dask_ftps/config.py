"""Defaults of dask_ftps, under the ``ftps.`` namespace of :mod:`dask.config`."""

from __future__ import annotations

import pathlib

import dask.config
import yaml

_FILE = pathlib.Path(__file__).with_name("ftps.yaml")

with _FILE.open() as f:
    _DEFAULTS = yaml.safe_load(f)

dask.config.update_defaults(_DEFAULTS)


def get(key: str):
    """Return ``dask.config.get("ftps." + key)``, falling back on ``ftps.yaml``.

    The fallback matters where a test harness resets ``dask.config.config``.
    """
    default = _DEFAULTS["ftps"]
    for part in key.split("."):
        default = default[part]
    return dask.config.get(f"ftps.{key}", default=default)
