"""A calculator tool for verl's ``tool_agent`` loop: exact integer arithmetic on + - * and parentheses.

It is the tool of the tiny arithmetic task, so multi-turn agent rollouts (tool tokens masked out of the
loss) can be exercised on CPU with the tiny models. Only a parsed arithmetic tree is evaluated; no
``eval`` of user text.
"""

from __future__ import annotations

import ast
import operator
from typing import Any

from verl.tools.base_tool import BaseTool
from verl.tools.schemas import OpenAIFunctionToolSchema, ToolResponse

_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}
MAX_EXPRESSION_CHARS = 200

SCHEMA = {
    "type": "function",
    "function": {
        "name": "calculator",
        "description": "Evaluate an integer arithmetic expression with + - * and parentheses.",
        "parameters": {
            "type": "object",
            "properties": {"expression": {"type": "string", "description": "e.g. 37 + 48"}},
            "required": ["expression"],
        },
    },
}


def evaluate(expression: str) -> int:
    """Value of an integer expression; ValueError for anything else (names, calls, division, huge input)."""
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise ValueError(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
    tree = ast.parse(expression, mode="eval")

    def value(node: ast.AST) -> int:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
            return _OPERATORS[type(node.op)](value(node.left), value(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -value(node.operand)
        raise ValueError(f"unsupported expression element: {ast.dump(node)[:60]}")

    return value(tree.body)


class CalculatorTool(BaseTool):
    def __init__(self, config: dict, tool_schema: OpenAIFunctionToolSchema | None = None):
        super().__init__(config, tool_schema or OpenAIFunctionToolSchema.model_validate(SCHEMA))

    async def execute(
        self, instance_id: str, parameters: dict[str, Any], **kwargs
    ) -> tuple[ToolResponse, float, dict]:
        expression = str(parameters.get("expression", ""))
        try:
            return ToolResponse(text=str(evaluate(expression))), 0.0, {"ok": 1}
        except (ValueError, SyntaxError, RecursionError) as error:
            return ToolResponse(text=f"error: {error}"), 0.0, {"ok": 0}
