"""Items registered by name: stages, degrade and recovery methods, task formats.

A second registration of a name is a bug (two modules claiming one name), so it is
refused; an unknown name is a user's typo, so the error lists the known names.
"""

from __future__ import annotations

from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, *, unknown: str = "unknown {kind} {name!r}; known: {known}"):
        """``unknown`` is the error text for a missing name, with ``{kind}``, ``{name}`` and
        ``{known}`` (the sorted names) filled in; name the config field a user set there."""
        self.kind = kind
        self._unknown = unknown
        self._items: dict[str, T] = {}

    def add(self, name: str, item: T) -> T:
        if name in self._items:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._items[name] = item
        return item

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise ValueError(self._unknown.format(
                kind=self.kind, name=name, known=", ".join(self.names()))) from None

    def names(self) -> tuple[str, ...]:
        return tuple(sorted(self._items))

    def __contains__(self, name: object) -> bool:
        return name in self._items
