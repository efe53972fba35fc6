"""Field-by-field reading of untrusted JSON-shaped mappings, with the field path.

The contract parser and the operator's resource parser walk the same kind of
input the same way, so the checks live here once. A reader raises
:class:`ContractError`; a subclass that must report failures in its own
terms overrides :meth:`Reader.fail` and :meth:`Reader.child`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NoReturn, Self, TypeVar

T = TypeVar("T")


class ContractError(ValueError):
    """A document that does not follow the contract; names the field path."""

    def __init__(self, path: str, value: object, message: str, show: bool = True) -> None:
        # NB: show=False for values that may be credentials (Secret data).
        text = f"{path or '<document>'}: {message}"
        super().__init__(f"{text} (got {shown(value)})" if show else text)
        self.path = path
        self.value = value if show else None


def shown(value: object) -> str:
    """A value as JSON, cut short enough for one line of an error message."""
    text = json.dumps(value, default=str)
    return text if len(text) <= 80 else text[:77] + "..."


class Reader:
    """A cursor over one mapping that knows its field path and refuses unknown keys."""

    def __init__(self, data: object, path: str) -> None:
        self.path = path
        if not isinstance(data, Mapping):
            self.fail("", data, "expected an object")
        self.data: Mapping[str, Any] = data
        self.seen: set[str] = set()

    def child(self, data: object, path: str) -> Self:
        """A reader of a nested mapping, reporting failures the way this one does."""
        return type(self)(data, path)

    def at(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def fail(self, key: str, value: object, message: str, show: bool = True) -> NoReturn:
        raise ContractError(self.at(key) if key else self.path, value, message, show)

    def raw(self, key: str, default: object = ...) -> Any:
        self.seen.add(key)
        value = self.data.get(key)
        if value is None:
            if default is ...:
                self.fail(key, None, "is required", show=False)
            return default
        return value

    def text(self, key: str, default: object = ..., choices: Sequence[str] = ()) -> Any:
        value = self.raw(key, default)
        if value is default:
            return value
        if not isinstance(value, str) or not value:
            self.fail(key, value, "expected a non-empty string")
        if choices and value not in choices:
            self.fail(key, value, f"expected one of {', '.join(choices)}")
        return value

    def integer(self, key: str, default: object = ..., minimum: int = 0) -> Any:
        value = self.raw(key, default)
        if value is default:
            return value
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(key, value, "expected an integer")
        if value < minimum:
            self.fail(key, value, f"must be at least {minimum}")
        return value

    def number(self, key: str, default: object = ...) -> Any:
        """A positive number, as a float."""
        value = self.raw(key, default)
        if value is default:
            return value
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            self.fail(key, value, "expected a positive number")
        return float(value)

    def flag(self, key: str, default: object = ...) -> bool:
        value = self.raw(key, default)
        if not isinstance(value, bool):
            self.fail(key, value, "expected true or false")
        return value

    def texts(self, key: str, default: object = ..., choices: Sequence[str] = ()) -> Any:
        value = self.raw(key, default)
        if value is default:
            return value
        if not isinstance(value, list):
            self.fail(key, value, "expected a list of strings")
        for index, item in enumerate(value):
            if not isinstance(item, str) or not item:
                self.fail(f"{key}[{index}]", item, "expected a non-empty string")
            if choices and item not in choices:
                self.fail(f"{key}[{index}]", item, f"expected one of {', '.join(choices)}")
        return tuple(value)

    def obj(self, key: str) -> Self:
        """The reader of a nested mapping (absent: empty); call its :meth:`done` after."""
        return self.child(self.raw(key, {}), self.at(key))

    def sub(self, key: str, parse_one: Callable[[Self], T]) -> T:
        reader = self.obj(key)
        result = parse_one(reader)
        reader.done()
        return result

    def optional(self, key: str, parse_one: Callable[[Self], T]) -> T | None:
        return None if self.raw(key, None) is None else self.sub(key, parse_one)

    def objects(self, key: str, parse_one: Callable[[Self], T]) -> tuple[T, ...]:
        value = self.raw(key, [])
        if not isinstance(value, list):
            self.fail(key, value, "expected a list")
        items = []
        for index, item in enumerate(value):
            reader = self.child(item, f"{self.at(key)}[{index}]")
            items.append(parse_one(reader))
            reader.done()
        return tuple(items)

    def done(self) -> None:
        """Refuse the first key nothing read: a typo must not pass as a default."""
        unknown = sorted(set(self.data) - self.seen)
        if unknown:
            self.fail(unknown[0], self.data[unknown[0]], "unknown field")
