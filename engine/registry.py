"""One registry type for every "name -> thing" table (estimators, surrogates, baselines, indices, ...).

A `Registry` is a read-only mapping in registration order. Entries are added once (`register`
refuses a second entry under the same name) and may be lazy: `register_lazy(name, "module:attr")`
imports the target on first lookup, so a registry can list what it cannot import yet.
`registry.lookup(name)` raises the registry's error type with the one wording
``unknown <kind> 'x'; choose from a, b, c``.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from typing import Generic, TypeVar

from engine.errors import WorkbenchError

T = TypeVar("T")


class _Lazy:
    __slots__ = ("path",)

    def __init__(self, path: str):
        self.path = path

    def load(self):
        module, _, attr = self.path.partition(":")
        return getattr(importlib.import_module(module), attr)


class Registry(Mapping, Generic[T]):
    """name -> T, in registration order; `kind` names the entries in errors ("estimator", ...);
    `error` is the exception type `lookup` raises for an unknown name (a WorkbenchError subclass)."""

    def __init__(self, kind: str, entries: Mapping[str, T] | None = None, error: type[Exception] = WorkbenchError):
        self.kind, self.error = kind, error
        self._entries: dict[str, object] = {}
        for name, value in (entries or {}).items():
            self.register(name, value)

    def register(self, name: str, value: T) -> T:
        """Add `value` under `name`; ValueError if the name is taken (a programming error, not user input)."""
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._entries[name] = value
        return value

    def register_lazy(self, name: str, path: str) -> None:
        """Add an entry imported from ``"module:attr"`` on first lookup."""
        self.register(name, _Lazy(path))

    def __getitem__(self, name: str) -> T:
        value = self._entries[name]
        if isinstance(value, _Lazy):
            value = self._entries[name] = value.load()
        return value

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {list(self._entries)})"

    def unknown(self, name) -> Exception:
        """The error for an unknown `name` (one wording for every registry)."""
        return self.error(f"unknown {self.kind} {name!r}; choose from {', '.join(self._entries)}")

    def lookup(self, name) -> T:
        """The entry for `name`; `self.unknown(name)` raised for an unknown one (`.get` keeps Mapping's None)."""
        if name not in self._entries:
            raise self.unknown(name)
        return self[name]
