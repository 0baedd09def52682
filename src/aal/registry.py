"""Small name -> factory registries (in the spirit of timm's ``register_model``).

Every pluggable piece of aal (models, attacks, methods, datasets, kernels) lives in a
:class:`Registry`. A registry maps a lower-case name to a factory (a class or a function)
and, optionally, to a frozen dataclass describing the factory's keyword arguments, so that
configs can be validated *before* any work starts.

Example:
    >>> from aal.registry import Registry
    >>> COLORS = Registry("color")
    >>> @COLORS.register("red")
    ... def red(intensity: float = 1.0):
    ...     return ("red", intensity)
    >>> COLORS.create("red", intensity=0.5)
    ('red', 0.5)
    >>> COLORS.names()
    ['red']
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Callable, Generic, Iterator, TypeVar

T = TypeVar("T")


class UnknownNameError(KeyError):
    """Raised when a name is not registered. The message lists close matches."""

    def __str__(self) -> str:  # KeyError quotes its message; we want plain text
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class Entry(Generic[T]):
    """One registered factory.

    Attributes:
        name: registered (lower-case) name.
        factory: the callable that builds the object.
        summary: first line of the factory's docstring, shown by ``aal list``.
    """

    name: str
    factory: Callable[..., T]
    summary: str


_BY_KIND: dict[str, "Registry[Any]"] = {}
"""Every registry by its ``kind``; read through :func:`lookup`."""


def lookup(kind: str) -> "Registry[Any]":
    """The library's registry of ``kind`` ("model", "method", "attention", "dataset", "attack", ...).

    A late lookup by name: :mod:`aal.config` sits at the bottom of the layering and checks names
    against registries that live above it, so it asks here at call time instead of importing
    them (importing ``aal`` imports every registry's package first).
    """
    if kind not in _BY_KIND:
        raise LookupError(f"no registry of kind {kind!r} (known: {', '.join(sorted(_BY_KIND))}); import aal first")
    return _BY_KIND[kind]


class Registry(Generic[T]):
    """A mapping from names to factories.

    Args:
        kind: what is registered ("model", "attack", ...); used in error messages.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Entry[T]] = {}
        self.from_spec: Callable[..., T] | None = None
        """Optional parser of short specs (the attacks' ``from_spec``), for :func:`lookup` callers."""
        # the first registry of a kind is the library's (aal/__init__ imports them all first)
        _BY_KIND.setdefault(kind, self)

    def register(self, name: str | None = None) -> Callable[[Callable[..., T]], Callable[..., T]]:
        """Decorator registering a factory under ``name`` (default: its ``__name__``)."""

        def deco(factory: Callable[..., T]) -> Callable[..., T]:
            key = (name or factory.__name__).lower()
            if key in self._entries:
                raise ValueError(f"{self.kind} {key!r} is already registered")
            doc = (factory.__doc__ or "").strip().splitlines()
            self._entries[key] = Entry(key, factory, doc[0] if doc else "")
            return factory

        return deco

    def get(self, name: str) -> Callable[..., T]:
        """Return the factory registered as ``name``; unknown names raise with suggestions."""
        key = name.lower()
        if key not in self._entries:
            close = difflib.get_close_matches(key, self._entries, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}{hint} (registered: {', '.join(self.names())})"
            )
        return self._entries[key].factory

    def create(self, name: str, /, *args: Any, **kwargs: Any) -> T:
        """Build the object registered as ``name`` with the given arguments."""
        return self.get(name)(*args, **kwargs)

    def names(self) -> list[str]:
        """Sorted registered names."""
        return sorted(self._entries)

    def entries(self) -> list[Entry[T]]:
        """Registered entries, sorted by name."""
        return [self._entries[k] for k in self.names()]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)
