"""The safe arithmetic evaluator: right values, None for everything else, never an exception."""
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cotmi_ds.arith import MAX_DEPTH, MAX_LENGTH, evaluate_arithmetic


@pytest.mark.parametrize("text, value", [
    ("( 84.0 / 2.0 )", 42.0),
    ("( ( 17.0 + 15.0 ) + 2.0 )", 34.0),
    ("( 10.0 - ( 6.0 + 3.0 ) )", 1.0),
    ("(84 / 2)", 42.0),
    ("2 + 3 * 4", 14.0),          # precedence
    ("(2 + 3) * 4", 20.0),
    ("8 / 4 / 2", 1.0),           # left associative
    ("10 - 4 - 3", 3.0),
    ("-3 + 5", 2.0),
    ("-(-3)", 3.0),
    ("2 * -3", -6.0),
    ("3 -- 2", 5.0),
    (".5 * 4", 2.0),
    ("7.", 7.0),
    ("  ( 1 )  ", 1.0),
    ("0 / 5", 0.0),
])
def test_values(text, value):
    assert evaluate_arithmetic(text) == value


@pytest.mark.parametrize("text", [
    "", "   ", "()", "(1 + 2", "1 + 2)", "1 +", "* 2", "2 3", "1.2.3", "1e3", "2 ** 3", "1 / 0", "1 / (2 - 2)",
    "322,775", "x + 1", "__import__('os').system('true')", "(1 + 2) (3)", "+1", "1 // 2", "1 % 2",
    "((491 - 21", "So the answer is (4 - 3)", "9" * 400, "1 / " + "9" * 400,
    "(" * (MAX_DEPTH + 1) + "1" + ")" * (MAX_DEPTH + 1), "-" * (MAX_DEPTH + 1) + "1",
    "1 + " * (MAX_LENGTH // 4 + 1) + "1", None, 42,
])
def test_rejected(text):
    assert evaluate_arithmetic(text) is None


def test_depth_and_length_limits_are_inclusive():
    assert evaluate_arithmetic("(" * MAX_DEPTH + "1" + ")" * MAX_DEPTH) == 1.0
    assert evaluate_arithmetic("-" * MAX_DEPTH + "1") == 1.0
    assert evaluate_arithmetic("1" + " " * (MAX_LENGTH - 1)) == 1.0


def test_overflow_gives_none():
    assert evaluate_arithmetic(" * ".join(["1" + "0" * 300] * 3)) is None


# Expression trees rendered as text and valued structurally (no eval anywhere).
_leaf = st.integers(0, 999).map(lambda n: (str(n), float(n))) | \
    st.decimals(0, 999, places=2, allow_nan=False).map(lambda d: (str(d), float(str(d))))


def _combine(children):
    def node(args):
        (a, va), op, (b, vb) = args
        if op == "/" and vb == 0:
            return f"( {a} - {b} )", va - vb
        value = {"+": va + vb, "-": va - vb, "*": va * vb, "/": va / vb if vb else 0.0}[op]
        return f"( {a} {op} {b} )", value
    return st.tuples(children, st.sampled_from("+-*/"), children).map(node) | \
        children.map(lambda c: (f"-{c[0]}", -c[1]))


@settings(max_examples=200, deadline=None)
@given(st.recursive(_leaf, _combine, max_leaves=12))
def test_random_expressions(expr):
    text, value = expr
    got = evaluate_arithmetic(text)
    assert got is not None and math.isclose(got, value, rel_tol=1e-9, abs_tol=1e-9), text


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("0123456789.+-*/() eax_,'\"\n")), max_size=80) | st.text(max_size=80))
def test_never_raises(text):
    result = evaluate_arithmetic(text)
    assert result is None or (isinstance(result, float) and math.isfinite(result))
