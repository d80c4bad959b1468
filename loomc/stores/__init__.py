"""Checkpoint stores: the protocol, the in-memory store and the SQLite store."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

from loomc.errors import ConfigError
from loomc.stores.base import CheckpointStore, RunRecord, StoredStep, Totals
from loomc.stores.memory import MemoryStore
from loomc.stores.sqlite import (CheckpointMovedWarning, ContainerFilesystemWarning, NetworkFilesystemWarning,
                                 SQLiteStore)

__all__ = ["CheckpointMovedWarning", "CheckpointStore", "ContainerFilesystemWarning", "MemoryStore",
           "NetworkFilesystemWarning", "SQLiteStore", "RunRecord", "StoredStep", "Totals", "open_store", "DEFAULT_DB",
           "default_path"]

#: Where the default store lives, relative to the working directory.
DEFAULT_DB = os.path.join(".loomc", "checkpoints.db")

_open: dict[tuple[Path, str], SQLiteStore] = {}
_open_lock = threading.Lock()


def default_path() -> str:
    """The default store's file: ``$LOOMC_DB``, else ``.loomc/checkpoints.db`` under the working directory."""
    return os.environ.get("LOOMC_DB") or DEFAULT_DB


def sqlite_at(path: str | os.PathLike[str], durability: str = "full", create: bool = True) -> SQLiteStore:
    """The process's one SQLiteStore for ``path`` (connections are reused, never reopened per run).

    With ``create=False`` a path with no database raises StoreError instead of creating one.
    """
    key = (Path(path).expanduser().resolve(), durability)
    with _open_lock:
        store = _open.get(key)
        if store is None:
            store = _open[key] = SQLiteStore(key[0], durability=durability, create=create)
        return store


def open_store(spec: Any) -> CheckpointStore:
    """The store that ``checkpoint=spec`` names.

    ``"sqlite"`` (the default file under the working directory), ``"memory"``,
    a path to a SQLite file, or any object that implements CheckpointStore.
    """
    if spec is None or spec == "sqlite":
        return sqlite_at(default_path())
    if spec == "memory":
        return MemoryStore()
    if isinstance(spec, (str, os.PathLike)):
        _check_path(spec)
        return sqlite_at(spec)
    if isinstance(spec, CheckpointStore):
        return spec
    needed = [name for name in dir(CheckpointStore) if not name.startswith("_")]
    missing = [name for name in needed if not callable(getattr(spec, name, None))]
    if len(missing) < len(needed) / 2:  # meant as a store: say what it lacks
        raise ConfigError(f"checkpoint={spec!r} lacks {', '.join(m + '()' for m in missing)}, which every "
                          "CheckpointStore has (see loomc/stores/base.py); loomc.testing.StoreConformance "
                          "checks a store against the protocol")
    raise ConfigError(f"checkpoint={spec!r}: use 'sqlite', 'memory', a path to a SQLite file, "
                      "or a CheckpointStore object")


def check_store_spec(spec: Any) -> None:
    """Refuse a bad ``checkpoint=`` at decoration time, without opening anything."""
    if isinstance(spec, (str, os.PathLike)):
        _check_path(spec)
        return
    if spec is None or isinstance(spec, CheckpointStore):
        return
    open_store(spec)


def _check_path(spec: str | os.PathLike[str]) -> None:
    """ConfigError for a ``checkpoint=`` string that cannot be meant as a SQLite file's path."""
    text = os.fspath(spec)
    if text in ("sqlite", "memory"):
        return
    if not text.strip():
        raise ConfigError("checkpoint='' is empty: use 'sqlite' (the default file), 'memory', or a path to a "
                          "SQLite file")
    if "://" in text:
        raise ConfigError(f"checkpoint={text!r} looks like a URL, but loomc opens no database servers: use "
                          "'sqlite', 'memory', a path to a SQLite file, or a CheckpointStore object (a store for "
                          "another database implements loomc.CheckpointStore; see README, Writing a store)")
    if text.strip().lower() in ("sqlite", "memory", "sqlite3", "mem", ":memory:"):
        meant = "memory" if "mem" in text.lower() else "sqlite"
        raise ConfigError(f"checkpoint={text!r} would be a file of that name in the working directory; "
                          f"write checkpoint={meant!r}, or give a path such as 'runs.db'")
