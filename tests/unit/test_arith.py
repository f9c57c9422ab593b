"""The SVAMP equation evaluator: right values, and for anything else None — never an exception,
never code execution, never unbounded work."""
import builtins
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cotmi_ds.data.arith import MAX_CHARS, MAX_DEPTH, evaluate_arithmetic, same_value


@pytest.mark.parametrize("text, value", [
    ("( 84.0 / 2.0 )", 42.0),                           # the DSS gold label format
    ("( 10.0 - ( 6.0 + 3.0 ) )", 1.0),
    ("( ( 10.0 + 45.0 ) * 2.0 )", 110.0),
    ("(10 * 45)", 450.0),                               # the teacher's format
    ("(10 - (3 + 6))", 1.0),
    ("1 + 2 * 3", 7.0),                                 # precedence
    ("(1 + 2) * 3", 9.0),
    ("8 / 4 / 2", 1.0),                                 # left-associative
    ("8 - 4 - 2", 2.0),
    ("10 / 4", 2.5),                                    # true division
    ("-3 + 5", 2.0),                                    # unary minus
    ("2 - -3", 5.0),
    ("-(2 * -3)", 6.0),
    ("--4", 4.0),
    (".5 + 5.", 5.5),
    ("0.1 + 0.2", 0.1 + 0.2),
    ("  7\t", 7.0),
    ("( 1.5 * ( 2.0 - ( 4.0 / 8.0 ) ) )", 2.25),
])
def test_known_values(text, value):
    assert evaluate_arithmetic(text) == value


@pytest.mark.parametrize("text", [
    "", "   ", "(", ")", "()", "(1", "1)", "1 2", "1 +", "* 2", "+3", "1 ++ 2", "2(3)", "(2)(3)", "1..2",
    "1e5", "0x10", "1_000", "abc", "x + 1", "9**9**9", "2 ** 10", "7 // 2", "7 % 2", "1/0", "0/0", "1 / (3 - 3)",
    "1/-0.0", "__import__('os').system('echo pwned')", "exec('1')", "open('/etc/passwd').read()",
    "(lambda: 1)()", "[1, 2]", "1; 2", "1 = 1", "∞", "１２",  # fullwidth digits are not ASCII digits
    "9" * 400,                                       # a literal beyond float range
    "1 / " + "9" * 400,                              # not silently 0
    "9" * 200 + " * " + "9" * 200,                   # finite literals, product overflows
    "1" + "0" * 308 + " * 10 - " + "1" + "0" * 308 + " * 10",  # inf - inf = nan
])
def test_invalid_text_gives_none(text):
    assert evaluate_arithmetic(text) is None


@pytest.mark.parametrize("value", [None, 12, 1.5, b"( 1 + 2 )", ["1"], object()])
def test_non_strings_give_none(value):
    assert evaluate_arithmetic(value) is None


def test_depth_and_length_are_bounded():
    assert evaluate_arithmetic("(" * MAX_DEPTH + "1" + ")" * MAX_DEPTH) == 1.0
    assert evaluate_arithmetic("(" * (MAX_DEPTH + 1) + "1" + ")" * (MAX_DEPTH + 1)) is None
    assert evaluate_arithmetic("-" * MAX_DEPTH + "1") == 1.0
    assert evaluate_arithmetic("-" * (MAX_DEPTH + 1) + "1") is None
    assert evaluate_arithmetic("(" * 10**6 + "1" + ")" * 10**6) is None     # far past the recursion limit
    assert evaluate_arithmetic(" + ".join(["1"] * 250)) == 250.0            # long but flat: fine
    assert evaluate_arithmetic(" + ".join(["1"] * (MAX_CHARS // 3 + 1))) is None


def test_never_executes_anything(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("the evaluator must not execute or compile text")

    for name in ("eval", "exec", "compile", "__import__"):
        monkeypatch.setattr(builtins, name, forbidden)
    assert evaluate_arithmetic("__import__('os').system('true')") is None
    assert evaluate_arithmetic("( 84.0 / 2.0 )") == 42.0
    assert evaluate_arithmetic("9**9**9") is None


def test_same_value_compares_numbers_not_strings():
    assert same_value("( 84.0 / 2.0 )", "(84 / 2)")
    assert same_value("( 2.0 * 21.0 )", "( 84.0 / 2.0 )")
    # Exactly equal floats, as the released scoring's eval(prediction) == eval(gold): its verdict.
    assert not same_value("( 0.1 + 0.2 )", "( 0.3 )")
    assert same_value("( 0.1 + 0.2 )", "( 0.2 + 0.1 )")
    assert not same_value("( 84.0 / 2.0 )", "( 84.0 / 3.0 )")
    assert not same_value("garbage", "garbage")                    # equal text that does not parse is wrong
    assert not same_value("1/0", "1/0")


# --- fuzzing -------------------------------------------------------------------------------------

@settings(max_examples=400, deadline=None)
@given(st.text(max_size=300))
def test_random_text_never_raises(text):
    value = evaluate_arithmetic(text)
    assert value is None or (isinstance(value, float) and math.isfinite(value))


@settings(max_examples=400, deadline=None)
@given(st.text(alphabet="0123456789.+-*/() \t9e_x", max_size=200))
def test_near_arithmetic_text_never_raises(text):
    value = evaluate_arithmetic(text)
    assert value is None or (isinstance(value, float) and math.isfinite(value))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(["9", "*", "**", "(", ")", "-", "9" * 50, "__import__('os')", " ", "."]),
                max_size=80))
def test_hostile_token_soup_never_raises(parts):
    value = evaluate_arithmetic("".join(parts))
    assert value is None or math.isfinite(value)


# Random expression trees, rendered as text with only the parentheses precedence needs (plus random
# extra ones and spacing); the expected value is computed on the tree with the same float operations.
_PREC = {"+": 1, "-": 1, "*": 2, "/": 2}


class _Undefined(Exception):
    pass


def _value(node):
    kind = node[0]
    if kind == "num":
        return float(node[1])
    if kind == "neg":
        return -_value(node[1])
    a, b = _value(node[2]), _value(node[3])
    if node[1] == "/" and b == 0:
        raise _Undefined
    v = {"+": a + b, "-": a - b, "*": a * b, "/": a / b if b else 0.0}[node[1]]
    if not math.isfinite(v):
        raise _Undefined
    return v


def _render(node, draw_space, draw_paren):
    kind = node[0]
    sp = draw_space()
    if kind == "num":
        text = node[1]
    elif kind == "neg":
        inner = _render(node[1], draw_space, draw_paren)
        text = "-" + (f"({inner})" if node[1][0] == "bin" else inner)
    else:
        op, left, right = node[1], node[2], node[3]
        lt, rt = _render(left, draw_space, draw_paren), _render(right, draw_space, draw_paren)
        if left[0] == "bin" and _PREC[left[1]] < _PREC[op]:
            lt = f"({lt})"
        if right[0] == "bin" and _PREC[right[1]] <= _PREC[op]:
            rt = f"({rt})"
        text = f"{lt}{sp}{op}{sp}{rt}"
    return f"( {text} )" if draw_paren() else text


_numbers = st.one_of(st.integers(0, 10**6).map(str),
                     st.tuples(st.integers(0, 9999), st.integers(0, 99)).map(lambda t: f"{t[0]}.{t[1]}"))
_trees = st.recursive(
    _numbers.map(lambda s: ("num", s)),
    lambda sub: st.one_of(st.tuples(st.just("bin"), st.sampled_from("+-*/"), sub, sub),
                          st.tuples(st.just("neg"), sub)),
    max_leaves=12)


@settings(max_examples=300, deadline=None)
@given(_trees, st.data())
def test_valid_equations_get_exactly_the_float_value(tree, data):
    text = _render(tree, lambda: data.draw(st.sampled_from(["", " ", "  "])),
                   lambda: data.draw(st.booleans()) and data.draw(st.booleans()))
    try:
        expected = _value(tree)
    except _Undefined:
        expected = None
    if len(text) > MAX_CHARS or text.count("(") + text.count("-") > MAX_DEPTH:
        return  # beyond the bounds; covered by test_depth_and_length_are_bounded
    assert evaluate_arithmetic(text) == expected, text
