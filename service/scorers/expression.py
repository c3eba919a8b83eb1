"""The total of a composite: an arithmetic expression over its components' values.

    correct + 0.2 * par(quality)
    min(correct, judge) - 0.1 * clip(length_penalty, 0, 1)

Numbers, component names, + - * / and unary minus, and the functions below; nothing else parses
(it is checked at start, so a registry with a typo does not start). Written by hand over Python's
`ast`: a dozen lines of a fixed grammar, where a general evaluator would accept far more than a
reward formula needs.

    par(x, ref=0)         sigmoid(x - ref)        (Reward Shaping to Mitigate Reward Hacking in RLHF)
    logsigmoid(x, ref=0)  log sigmoid(x - ref)
    sigmoid(x)
    clip(x, lo, hi)
    min(a, b, ...), max(a, b, ...), abs(x)
"""

from __future__ import annotations

import ast
import operator
from typing import Callable

from rewardserve.transforms.fits import sigmoid
from rewardserve.transforms.pointwise import log_sigmoid

FUNCTIONS: dict[str, tuple[Callable, int, int]] = {  # name -> (function, fewest arguments, most)
    "par": (lambda x, ref=0.0: sigmoid(x - ref), 1, 2),
    "logsigmoid": (lambda x, ref=0.0: log_sigmoid(x - ref), 1, 2),
    "sigmoid": (sigmoid, 1, 1),
    "clip": (lambda x, lo, hi: min(max(x, lo), hi), 3, 3),
    "min": (min, 2, 64),
    "max": (max, 2, 64),
    "abs": (abs, 1, 1),
}
_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos}


def compile_total(text: str, names: set[str]) -> Callable[[dict[str, float]], float]:
    """The expression as a function of the components' values; ValueError says what does not parse."""
    try:
        tree = ast.parse(text, mode="eval").body
    except SyntaxError as exc:
        raise ValueError(f"{text!r} does not parse: {exc.msg}") from None

    def build(node) -> Callable[[dict], float]:
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
            value = float(node.value)
            return lambda v: value
        if isinstance(node, ast.Name):
            if node.id not in names:
                raise ValueError(f"{node.id!r} is not a component; the components are {sorted(names)}")
            return lambda v, n=node.id: v[n]
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            op, a, b = _BINARY[type(node.op)], build(node.left), build(node.right)
            return lambda v: op(a(v), b(v))
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            op, a = _UNARY[type(node.op)], build(node.operand)
            return lambda v: op(a(v))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and not node.keywords:
            if node.func.id not in FUNCTIONS:
                raise ValueError(f"{node.func.id}() is not a function here; they are {sorted(FUNCTIONS)}")
            fn, least, most = FUNCTIONS[node.func.id]
            if not least <= len(node.args) <= most:
                raise ValueError(f"{node.func.id}() takes {least}" + (f" to {most}" if most > least else "")
                                 + f" arguments, not {len(node.args)}")
            args = [build(a) for a in node.args]
            return lambda v: fn(*(a(v) for a in args))
        raise ValueError(f"{ast.unparse(node)!r}: only numbers, component names, + - * /, and "
                         f"{', '.join(sorted(FUNCTIONS))}() are allowed")

    return build(tree)
