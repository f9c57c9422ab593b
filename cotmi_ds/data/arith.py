"""A safe arithmetic evaluator for SVAMP-style equations such as ``( 10.0 - ( 6.0 + 3.0 ) )``.

The released code scores SVAMP by calling Python's ``eval()`` on the model's output, which executes
whatever the model writes. This is a real parser instead; it only ever computes with floats:

    expr  := term  (("+" | "-") term)*
    term  := unary (("*" | "/") unary)*
    unary := "-" unary | primary
    primary := NUMBER | "(" expr ")"
    NUMBER := digits ["." digits] | "." digits   (ASCII digits; no exponent; the sign is unary minus)

Operators are left-associative with the usual precedence, so a well-formed equation gets the value
Python's ``eval`` gives it, computed in floats. Input is bounded (``MAX_CHARS`` characters and
``MAX_DEPTH`` nested parentheses/unary minus signs), so the work is linear in a bounded length.
Anything else — a syntax error, a division by zero, a literal or any intermediate result that
overflows to inf (or is nan), text too long or too deep, a non-string — gives ``None``; nothing raises.
"""
from __future__ import annotations

import math
import re

MAX_CHARS = 1000   # SVAMP labels are at most 31 characters; generation is capped at 64 tokens
MAX_DEPTH = 50     # parentheses plus unary minus signs, nested

_TOKEN = re.compile(r"\s*(?:([0-9]+(?:\.[0-9]*)?|\.[0-9]+)|([-+*/()]))", re.ASCII)


class _Invalid(Exception):
    """Internal: the text is not a valid bounded equation."""


def _tokenize(text: str) -> list[str | float]:
    tokens: list[str | float] = []
    pos, end = 0, len(text.rstrip(" \t\n\r\f\v"))
    while pos < end:
        m = _TOKEN.match(text, pos)
        if m is None:
            raise _Invalid
        number, op = m.groups()
        tokens.append(_finite(float(number)) if number is not None else op)
        pos = m.end()
    return tokens


def _finite(value: float) -> float:
    """Overflow anywhere (a literal too large for a float, or an operation's result) is invalid,
    not just at the end: ``1 / 9999...9`` must not quietly become 0."""
    if not math.isfinite(value):
        raise _Invalid
    return value


def _apply(op: str, a: float, b: float) -> float:
    if op == "/" and b == 0.0:
        raise _Invalid
    return _finite({"+": a + b, "-": a - b, "*": a * b}[op] if op != "/" else a / b)


class _Parser:
    def __init__(self, tokens: list[str | float]):
        self.tokens, self.pos, self.depth = tokens, 0, 0

    def _peek(self):
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def _take(self):
        tok = self._peek()
        self.pos += 1
        return tok

    def _enter(self) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise _Invalid

    def parse(self) -> float:
        value = self._expr()
        if self.pos != len(self.tokens):
            raise _Invalid
        return value

    def _expr(self) -> float:
        return self._chain(("+", "-"), self._term)

    def _term(self) -> float:
        return self._chain(("*", "/"), self._unary)

    def _chain(self, ops: tuple[str, str], operand) -> float:
        """operand (op operand)*, left-associative."""
        value = operand()
        while self._peek() in ops:
            op = self._take()
            value = _apply(op, value, operand())
        return value

    def _unary(self) -> float:
        if self._peek() == "-":
            self._take()
            self._enter()
            value = -self._unary()
            self.depth -= 1
            return value
        return self._primary()

    def _primary(self) -> float:
        tok = self._take()
        if isinstance(tok, float):
            return tok
        if tok == "(":
            self._enter()
            value = self._expr()
            if self._take() != ")":
                raise _Invalid
            self.depth -= 1
            return value
        raise _Invalid


def evaluate_arithmetic(text: str) -> float | None:
    """The value of an arithmetic equation, or ``None`` if it is not one (see the module docstring).

    >>> evaluate_arithmetic("( 84.0 / 2.0 )")
    42.0
    >>> evaluate_arithmetic("__import__('os')") is None
    True
    """
    if not isinstance(text, str) or len(text) > MAX_CHARS:
        return None
    try:
        value = _Parser(_tokenize(text)).parse()
    except (_Invalid, OverflowError, ZeroDivisionError):
        return None
    return value


def same_value(a: str, b: str) -> bool:
    """Both sides parse and have equal values, exactly, as the released scoring compares
    ``eval(prediction) == eval(gold)``: ``( 0.1 + 0.2 )`` is not ``( 0.3 )`` (0.30000000000000004)."""
    x, y = evaluate_arithmetic(a), evaluate_arithmetic(b)
    return x is not None and y is not None and x == y
