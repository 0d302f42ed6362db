"""Tool environments for agentic RL (the GLM-4.5 report's multi-turn RL with tools).

An `Environment` plays one episode: `reset(problem)` starts it and returns a first observation
("" for none: the problem's prompt is already the user turn), then every model turn that calls
tools is answered by `step(tool_calls)` -> (observation, done, reward). The calls are those
`glm_jax.infer.chat.parse_output` returns (`{"name": str, "arguments": dict}`); the observation
becomes the `<|observation|>` turn the model reads next. `done` ends the episode, scored
`reward`; otherwise `reward` is ignored and the episode goes on until a model turn calls no
tool: that turn is the final answer, scored by the problem's own reward.

`ENVIRONMENTS` names the built-in ones; each class says in `kinds` which task kinds are played
in it (`glm_jax.data.tasks`).
"""

from __future__ import annotations

import ast
import operator
from fractions import Fraction
from typing import Protocol

from glm_jax.data.tasks import Problem

MAX_EXPRESSION_CHARS = 200


class Environment(Protocol):
    def reset(self, problem: Problem) -> str:
        ...

    def step(self, tool_calls: list[dict]) -> tuple[str, bool, float]:
        ...


class ExpressionError(ValueError):
    """An expression the calculator does not evaluate; the message is the tool's answer."""


_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
           ast.Div: operator.truediv}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}


def calculate(expression: str) -> Fraction:
    """The value of an arithmetic expression of integers, + - * / and parentheses, read from
    its syntax tree (never `eval`: anything else in the tree is refused)."""
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise ExpressionError(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except (SyntaxError, ValueError, MemoryError, RecursionError) as e:
        raise ExpressionError(f"not an arithmetic expression ({type(e).__name__})") from None
    return _value(tree.body)


def _value(node: ast.AST) -> Fraction:
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return Fraction(node.value)
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _value(node.left), _value(node.right)
        if isinstance(node.op, ast.Div) and right == 0:
            raise ExpressionError("division by zero")
        return _BINARY[type(node.op)](left, right)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_value(node.operand))
    what = type(getattr(node, "op", node)).__name__  # Pow, not BinOp, for `2 ** 8`
    raise ExpressionError(f"unsupported {what} (integers and + - * / only)")


def _shown(value: Fraction) -> str:
    """An integer as itself, anything else as a decimal."""
    return str(value.numerator) if value.denominator == 1 else repr(float(value))


class CalculatorEnvironment:
    """The `calculator(expression=...)` tool of the built-in tasks. Each call is answered with
    its value, or an `error: ...` line (unknown tool, bad arguments, bad expression), one line
    per call; the episode ends when the model answers without calling."""

    kinds = ("calculator_answer",)
    tool = "calculator"

    def reset(self, problem: Problem) -> str:
        return ""

    def step(self, tool_calls: list[dict]) -> tuple[str, bool, float]:
        return "\n".join(self._answer(call) for call in tool_calls), False, 0.0

    def _answer(self, call: dict) -> str:
        name, arguments = call.get("name"), call.get("arguments")
        if name != self.tool:
            return f"error: unknown tool {name!r} (the tool is {self.tool!r})"
        if not isinstance(arguments, dict) or set(arguments) != {"expression"}:
            return "error: calculator takes one argument, 'expression'"
        expression = arguments["expression"]
        if type(expression) is int:  # parse_output decodes a bare number as JSON
            expression = str(expression)
        if not isinstance(expression, str):
            return "error: 'expression' must be a string"
        try:
            return _shown(calculate(expression))
        except ExpressionError as e:
            return f"error: {e}"


ENVIRONMENTS: dict[str, type] = {"calculator": CalculatorEnvironment}


def environment_for(kind: str) -> str:
    """The name of the built-in environment that plays task `kind`, or "" (single-turn)."""
    return next((name for name, env in ENVIRONMENTS.items() if kind in env.kinds), "")
