"""One registry mechanism for everything chosen by name: checkpoint formats (endpoints),
``--converter`` built-ins and the family YAMLs' module convertors.

Entries are registered with a decorator next to their code, with a one-line help text; the
``--help`` texts, the error for an unknown name and the README tables are derived from here,
so there is no second list to keep in step. The module imports nothing heavy (``--help`` stays
fast): an entry that needs torch registers a small loader function that imports on use.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

from .errors import ConversionError

T = TypeVar("T")


@dataclass(frozen=True)
class Entry(Generic[T]):
    name: str
    help: str
    value: T


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind  # "checkpoint format", "converter", ... (used in messages)
        self._entries: dict[str, Entry[T]] = {}

    def register(self, name: str, help: str) -> Callable[[T], T]:
        """Decorator: ``@REGISTRY.register("name", "what it does")``."""
        def add(value: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = Entry(name, help, value)
            return value
        return add

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[Entry[T]]:
        return iter(sorted(self._entries.values(), key=lambda e: e.name))

    def names(self) -> list[str]:
        return sorted(self._entries)

    def get(self, name: str, where: str = "") -> T:
        """The entry's value; an unknown name is one error line listing the known ones."""
        entry = self._entries.get(name)
        if entry is None:
            prefix = f"{where}: " if where else ""
            raise ConversionError(f"{prefix}unknown {self.kind} {name!r}; known: {', '.join(self.names())}")
        return entry.value

    def help_text(self) -> str:
        """``name`` (help); ... for an argparse help string."""
        return "; ".join(f"{e.name} ({e.help})" for e in self)

    def markdown_table(self, header: str) -> str:
        """The README table of this registry (checked against the README by a test)."""
        lines = [f"| {header} | what it does |", "|---|---|"]
        lines += [f"| `{e.name}` | {e.help} |" for e in self]
        return "\n".join(lines)
