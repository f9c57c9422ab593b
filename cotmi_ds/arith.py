"""A safe evaluator for the arithmetic in SVAMP labels, e.g. ``( ( 17.0 + 15.0 ) + 2.0 )``.

The released code calls Python's ``eval()`` on teacher and model output, which executes arbitrary
text. This is a recursive-descent parser over a closed grammar; it computes a number or gives up:

    expr   := term (("+" | "-") term)*
    term   := factor (("*" | "/") factor)*
    factor := "-" factor | "(" expr ")" | number          number: 12, 12.5, .5, 12.

Anything else (names, ``**``, commas, exponents, empty text), division by zero, a non-finite result,
text longer than ``MAX_LENGTH`` characters or nesting deeper than ``MAX_DEPTH`` gives ``None``.
It never raises.
"""
from __future__ import annotations

import math
import re

MAX_LENGTH = 1000  # characters; SVAMP equations are < 100
MAX_DEPTH = 64     # nested parentheses / unary minus signs

_TOKEN = re.compile(r"\s*(?:(\d+\.?\d*|\.\d+)|([-+*/()]))")


class _Reject(Exception):
    pass


def _tokenize(text: str) -> list[str | float]:
    tokens: list[str | float] = []
    pos, end = 0, len(text.rstrip())
    while pos < end:
        m = _TOKEN.match(text, pos)
        if m is None:
            raise _Reject
        if m.group(1) is not None:
            number = float(m.group(1))
            if not math.isfinite(number):  # hundreds of digits
                raise _Reject
            tokens.append(number)
        else:
            tokens.append(m.group(2))
        pos = m.end()
    return tokens


class _Parser:
    def __init__(self, tokens: list[str | float]):
        self.tokens, self.i, self.depth = tokens, 0, 0

    def peek(self):
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def take(self):
        tok = self.peek()
        self.i += 1
        return tok

    def expr(self) -> float:
        value = self.term()
        while self.peek() in ("+", "-"):
            value = value + self.term() if self.take() == "+" else value - self.term()
        return value

    def term(self) -> float:
        value = self.factor()
        while self.peek() in ("*", "/"):
            if self.take() == "*":
                value = value * self.factor()
            else:
                divisor = self.factor()
                if divisor == 0:
                    raise _Reject
                value = value / divisor
        return value

    def factor(self) -> float:
        tok = self.take()
        if isinstance(tok, float):
            return tok
        if tok not in ("-", "("):
            raise _Reject
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise _Reject
        if tok == "-":
            value = -self.factor()
        else:
            value = self.expr()
            if self.take() != ")":
                raise _Reject
        self.depth -= 1
        return value


def evaluate_arithmetic(text: str) -> float | None:
    """The value of ``text`` as arithmetic (numbers, + - * /, unary minus, parentheses), or None."""
    if not isinstance(text, str) or len(text) > MAX_LENGTH:
        return None
    try:
        parser = _Parser(_tokenize(text))
        value = parser.expr()
        if parser.peek() is not None:  # text left over, e.g. "( 1 + 2 ) 3"
            return None
    except (_Reject, ArithmeticError, RecursionError, ValueError):
        return None
    return value if math.isfinite(value) else None
