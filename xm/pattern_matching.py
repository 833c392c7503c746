"""Type-based dispatch, kept for code ported from XManager.

`match(*handlers)` returns a function that calls the first handler whose
argument types all match (by `isinstance`). The rest of `xm` uses plain
`isinstance` chains; this module is internal and exists so that code which
imported `xmanager.xm.pattern_matching` keeps working.
"""

from __future__ import annotations

import typing
from typing import Any, Awaitable, Callable, Iterable, Tuple, Union


def _runtime_type(annotation: Any) -> Any:
    """Maps `Callable[..., X]`, `List[int]` etc. to the class `isinstance` needs."""
    return getattr(annotation, "__origin__", annotation)


class Case:
    """One branch of a `match`: the argument types and the handler to call."""

    kind: Tuple[Any, ...]
    handle: Any

    def __init__(self, kind: Iterable[Any], handler: Callable[..., Any]) -> None:
        self.kind = tuple(_runtime_type(t) for t in kind)
        self.handle = handler

    def matches(self, *values: Any) -> bool:
        """Whether every value is an instance of its type (`Any` matches all)."""
        if len(values) != len(self.kind):
            return False
        return all(
            expected is Any or isinstance(value, expected)
            for expected, value in zip(self.kind, values)
        )

    def __repr__(self) -> str:
        return f"Case({self.kind!r}, {self.handle!r})"


def _deduce_types(handler: Callable[..., Any]) -> Tuple[Any, ...]:
    """Reads the handler's positional parameter annotations as its case types."""
    import inspect

    try:
        hints = typing.get_type_hints(handler)
    except Exception:  # e.g. a string annotation naming a local class
        hints = dict(getattr(handler, "__annotations__", {}))
    kinds = []
    for parameter in inspect.signature(handler).parameters.values():
        if parameter.kind not in (parameter.POSITIONAL_ONLY, parameter.POSITIONAL_OR_KEYWORD):
            continue
        if parameter.name not in hints:
            raise ValueError(
                f"{parameter.name} argument of a {handler} is missing a type annotation."
            )
        kinds.append(hints[parameter.name])
    return tuple(kinds)


def match(*handlers: Union[Case, Callable[..., Any]]) -> Callable[..., Any]:
    """Builds a dispatcher over `handlers` (annotated functions or `Case`s).

    The dispatcher applies the earliest handler whose types match the values
    and raises `TypeError` when none does.
    """
    cases = [h if isinstance(h, Case) else Case(_deduce_types(h), h) for h in handlers]

    def apply(*values: Any) -> Any:
        for case in cases:
            if case.matches(*values):
                return case.handle(*values)
        value_types = tuple(type(value) for value in values)
        known_types = "\n".join(str(case.kind) for case in cases)
        raise TypeError(
            f"{values} did not match any type pattern. Values have following types:\n"
            f"{value_types}\nWhich does not match any of:\n{known_types}"
        )

    return apply


def async_match(*handlers: Callable[..., Any]) -> Callable[..., Awaitable[Any]]:
    """`match` for async handlers (the same dispatcher, typed for awaiting)."""
    return match(*handlers)
