"""Megatron's ``--moe-layer-freq`` list expression, as LoongForge's model YAML writes it in
``${moe_freq:"<list expression>"}``: a tiny parser for ``[a, b]*n + [c]*m`` (never ``eval``),
with limits on the text and the list, and :func:`freq_text`, the compact form back.
"""
from __future__ import annotations

import re
from collections.abc import Iterable

_MAX_EXPR_CHARS = 1000
_MAX_LIST_LEN = 100_000
_TOKEN = re.compile(r"[ \t]*(?:([0-9]+)|([\[\],*+]))")  # ASCII digits only


def parse_layer_freq(text: str) -> list[int]:
    """Megatron's ``--moe-layer-freq`` list expression, e.g. ``[0]*3+[1]*58``.

    Grammar (nothing else: no names, calls, attributes, parentheses or other operators)::

        expr := term ('+' term)*
        term := list ('*' INT)? | INT '*' list
        list := '[' [INT (',' INT)* [',']] ']'

    Raises ValueError for anything outside it, or for a list longer than 100000."""
    if not isinstance(text, str) or len(text) > _MAX_EXPR_CHARS:
        raise ValueError("not a list expression")
    tokens: list[str] = []
    pos = 0
    text = text.strip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m:
            raise ValueError(f"unexpected {text[pos:pos + 10]!r}")
        tokens.append(m.group(1) or m.group(2))
        pos = m.end()
    i = 0

    def peek() -> str | None:
        return tokens[i] if i < len(tokens) else None

    def take(expected: str | None = None) -> str:
        nonlocal i
        tok = peek()
        if tok is None or (expected is not None and tok != expected):
            raise ValueError(f"expected {expected or 'more'}, got {tok!r}")
        i += 1
        return tok

    def integer() -> int:
        tok = take()
        if not re.fullmatch(r"[0-9]+", tok):
            raise ValueError(f"expected an integer, got {tok!r}")
        return int(tok)

    def plain_list() -> list[int]:
        take("[")
        items: list[int] = []
        while peek() != "]":
            items.append(integer())
            if peek() == ",":
                take(",")
            elif peek() != "]":
                raise ValueError(f"expected ',' or ']', got {peek()!r}")
        take("]")
        return items

    def repeat(items: list[int], count: int, total: int) -> list[int]:
        if total + len(items) * count > _MAX_LIST_LEN:
            raise ValueError(f"list longer than {_MAX_LIST_LEN}")
        return items * count

    out: list[int] = []
    while True:
        if peek() == "[":
            items = plain_list()
            if peek() == "*":
                take("*")
                items = repeat(items, integer(), len(out))
        else:
            count = integer()
            take("*")
            items = repeat(plain_list(), count, len(out))
        if len(out) + len(items) > _MAX_LIST_LEN:
            raise ValueError(f"list longer than {_MAX_LIST_LEN}")
        out.extend(items)
        if peek() is None:
            return out
        take("+")


def freq_text(pattern: Iterable[int]) -> str:
    """A 0/1 list in the compact form Megatron users write, e.g. ``[0]*3+[1]*58``."""
    runs: list[list[int]] = []
    for value in pattern:
        if runs and runs[-1][0] == value:
            runs[-1][1] += 1
        else:
            runs.append([value, 1])
    return "+".join(f"[{v}]*{n}" for v, n in runs) or "[]"
