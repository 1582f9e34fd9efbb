"""One small generic registry: register by decorator, build by name, list, suggest on a typo."""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Callable, Generic, Iterator, TypeVar

from mipha_lab.errors import UnknownNameError

T = TypeVar("T")


@dataclass(frozen=True)
class Entry(Generic[T]):
    name: str
    obj: T
    description: str


def _first_line(text: str | None) -> str:
    return (text or "").strip().splitlines()[0] if (text or "").strip() else ""


class Registry(Generic[T]):
    """Named entries of one kind of component.

    `loader` fills the registry lazily on first use (cards are read from disk only when asked for);
    `resolver` may produce an entry for a name that follows a pattern (e.g. `mlp3x_gelu`).
    """

    def __init__(
        self,
        kind: str,
        description: str,
        loader: Callable[["Registry[T]"], None] | None = None,
        resolver: Callable[[str], Entry[T] | None] | None = None,
    ) -> None:
        self.kind = kind
        self.description = description
        self._entries: dict[str, Entry[T]] = {}
        self._loader = loader
        self._loaded = loader is None
        self.resolver = resolver

    def _ensure_loaded(self) -> None:
        if not self._loaded:
            self._loaded = True
            assert self._loader is not None
            self._loader(self)

    def add(self, name: str, obj: T, description: str = "", *, replace: bool = False) -> T:
        """Add `obj` under `name`; a second entry of the same name is an error unless `replace`."""
        self._ensure_loaded()
        if name in self._entries and not replace:
            raise ValueError(f"{self.kind} '{name}' is already registered; pass replace=True to override it")
        self._entries[name] = Entry(name, obj, description or _first_line(getattr(obj, "__doc__", None)))
        return obj

    def register(self, name: str, description: str = "", *, replace: bool = False) -> Callable[[T], T]:
        """Decorator form of `add`: `@VISION.register("my-encoder")`."""

        def decorate(obj: T) -> T:
            return self.add(name, obj, description, replace=replace)

        return decorate

    def entry(self, name: str) -> Entry[T]:
        self._ensure_loaded()
        if name in self._entries:
            return self._entries[name]
        if self.resolver is not None and (resolved := self.resolver(name)) is not None:
            return resolved
        close = difflib.get_close_matches(name, list(self._entries), n=5, cutoff=0.5)
        hint = f"; did you mean: {', '.join(close)}?" if close else ""
        known = ", ".join(sorted(self._entries)) or "(none registered)"
        raise UnknownNameError(f"unknown {self.kind} '{name}'{hint} (known: {known})")

    def get(self, name: str) -> T:
        return self.entry(name).obj

    def build(self, name: str, **kwargs: Any) -> Any:
        """Call the registered factory or class with `kwargs`."""
        factory = self.get(name)
        if not callable(factory):
            raise TypeError(f"{self.kind} '{name}' is not buildable (it is a {type(factory).__name__})")
        return factory(**kwargs)

    def names(self) -> list[str]:
        self._ensure_loaded()
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        self._ensure_loaded()
        return name in self._entries

    def __iter__(self) -> Iterator[Entry[T]]:
        self._ensure_loaded()
        return iter(sorted(self._entries.values(), key=lambda e: e.name))

    def __len__(self) -> int:
        self._ensure_loaded()
        return len(self._entries)
