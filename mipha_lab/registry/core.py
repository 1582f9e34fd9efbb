"""One small generic registry: register by decorator, build by name, list, suggest on a typo.

Every entry arrives through `register`: Python classes and factories as a decorator
(`@PROJECTORS.register("mlp2x_gelu")`), objects such as templates by calling it
(`TEMPLATES.register("phi", aliases=("v0",))(Template(...))`), and YAML cards by the registry itself
when it is declared with `cards=KIND` (read on first use from every card folder; see cards.py). A name
with integer fields (`mlp{depth}x_gelu`) matches a family of names and passes the fields on.
"""

from __future__ import annotations

import difflib
import functools
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar, cast

from mipha_lab.errors import UnknownNameError
from mipha_lab.registry.cards import card_dirs, iter_card_files, read_card

T = TypeVar("T")


@dataclass(frozen=True)
class Entry(Generic[T]):
    """One registered name: the object, and a line that describes it."""

    name: str
    obj: T
    description: str


def _describe(obj: object) -> str:
    """An object's own `description` (cards, templates, benchmarks), else the first line of its docstring."""
    own = getattr(obj, "description", None)
    text = own if isinstance(own, str) else getattr(obj, "__doc__", None)
    return (text or "").strip().splitlines()[0] if (text or "").strip() else ""


def _family(name: str) -> re.Pattern[str] | None:
    """`mlp{depth}x_gelu` -> a pattern whose groups are the integer fields; None for a plain name."""
    if "{" not in name:
        return None
    return re.compile(re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>\\d+)", re.escape(name)))


class Registry(Generic[T]):
    """Named entries of one kind of component; `cards` names the card folder kind it also holds."""

    def __init__(self, kind: str, description: str, cards: str | None = None) -> None:
        self.kind = kind
        self.description = description
        self.cards = cards
        self._entries: dict[str, Entry[T]] = {}
        self._card_dirs_read: list[Path] = []

    def _read_new_cards(self) -> None:
        """Cards of folders not read yet, in folder order (a later folder's card replaces an earlier one)."""
        if self.cards is None:
            return
        new = [folder for folder in card_dirs() if folder not in self._card_dirs_read]
        self._card_dirs_read += new  # before registering: register() calls back here
        for path in iter_card_files(self.cards, new):
            card = read_card(path, self.cards)
            self.register(card.name, replace=True)(card)  # type: ignore[arg-type]

    def register(
        self, name: str, description: str = "", *, aliases: tuple[str, ...] = (), replace: bool = False
    ) -> Callable[[T], T]:
        """Add the decorated (or given) object under `name` and its aliases; a name already taken is an error
        unless `replace`."""

        def add(obj: T) -> T:
            self._read_new_cards()
            for each in (name, *aliases):
                if each in self._entries and not replace:
                    raise ValueError(f"{self.kind} '{each}' is already registered; pass replace=True to override it")
                text = description or _describe(obj)
                self._entries[each] = Entry(each, obj, text if each == name else f"alias of {name}")
            return obj

        return add

    def entry(self, name: str) -> Entry[T]:
        self._read_new_cards()
        if name in self._entries:
            return self._entries[name]
        for family, entry in self._entries.items():
            pattern = _family(family)
            match = pattern.fullmatch(name) if pattern else None
            if match:
                fields = {key: int(value) for key, value in match.groupdict().items()}
                factory: Any = entry.obj  # a family is registered on a callable taking its fields
                return Entry(name, cast(T, functools.partial(factory, **fields)), entry.description)
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
        self._read_new_cards()
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        self._read_new_cards()
        return name in self._entries

    def __iter__(self) -> Iterator[Entry[T]]:
        self._read_new_cards()
        return iter(sorted(self._entries.values(), key=lambda e: e.name))

    def __len__(self) -> int:
        self._read_new_cards()
        return len(self._entries)
