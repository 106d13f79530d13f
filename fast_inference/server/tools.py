"""Tool-calling requests: `tools`, `tool_choice` and `parallel_tool_calls` validated; the JSON schema that
enforces `required` and a named function; and which output parser a request's choices get."""

import re
from dataclasses import dataclass

from .errors import invalid, unsupported

_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")  # OpenAI's rule for function names

# The shapes of the tool fields, for /openapi.json (the functions below are the check).
TOOL_SCHEMA = {
    "type": "object",
    "required": ["type", "function"],
    "properties": {
        "type": {"enum": ["function"]},
        "function": {
            "type": "object",
            "required": ["name"],
            "properties": {
                "name": {"type": "string", "pattern": _NAME.pattern},
                "description": {"type": "string"},
                "parameters": {"type": "object", "description": "A JSON Schema of the arguments"},
                "strict": {"type": ["boolean", "null"]},
            },
        },
    },
}
NAMED_SCHEMA = {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}}
TOOL_CHOICE_SCHEMA = {
    "anyOf": [
        {"enum": ["none", "auto", "required", None]},
        {
            "type": "object",
            "required": ["type", "function"],
            "properties": {"type": {"enum": ["function"]}, "function": NAMED_SCHEMA},
        },
        {
            "type": "object",
            "required": ["type", "allowed_tools"],
            "properties": {
                "type": {"enum": ["allowed_tools"]},
                "allowed_tools": {
                    "type": "object",
                    "required": ["mode", "tools"],
                    "properties": {"mode": {"enum": ["auto", "required"]}, "tools": {"type": "array"}},
                },
            },
        },
    ]
}
HISTORY_TOOL_CALL_SCHEMA = {
    "type": "object",
    "required": ["function"],
    "properties": {
        "id": {"type": "string"},
        "type": {"enum": ["function"]},
        "function": {
            "type": "object",
            "required": ["name", "arguments"],
            "properties": {"name": {"type": "string"}, "arguments": {"type": "string"}},
        },
    },
}


@dataclass(slots=True)
class ToolRequest:
    tools: list[dict]  # the OpenAI tool objects, validated
    choice: str  # "none" | "auto" | "required" | "function"
    function: str | None  # the named function when choice is "function"
    parallel: bool
    legacy: bool = False  # asked with the deprecated `functions`: answered as `function_call`
    allowed: list[str] | None = None  # tool_choice allowed_tools: the names the model may call

    @property
    def render_tools(self) -> list[dict] | None:
        """What the template shows the model: nothing when it must not call (OpenAI's `none`)."""
        return self.tools if self.tools and self.choice != "none" else None

    @property
    def max_calls(self) -> int | None:
        return None if self.parallel else 1

    def schema(self) -> dict | None:
        """The JSON schema the grammar enforces: a named function's parameters, or for `required` an array
        of one or more {"name", "parameters"} calls (one anyOf branch per tool); None for auto / none."""
        if self.choice == "function":
            return _parameters(self._tool(self.function))
        if self.choice != "required":
            return None
        branches = [
            {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "enum": [tool["function"]["name"]]},
                    "parameters": _parameters(tool),
                },
                "required": ["name", "parameters"],
                "additionalProperties": False,
            }
            for tool in self.tools
            if self.allowed is None or tool["function"]["name"] in self.allowed
        ]
        schema = {"type": "array", "minItems": 1, "items": {"anyOf": branches}}
        if not self.parallel:
            schema["maxItems"] = 1
        return schema

    def _tool(self, name: str) -> dict:
        return next(t for t in self.tools if t["function"]["name"] == name)


def _parameters(tool: dict) -> dict:
    # A function without parameters takes none (OpenAI's reading of an absent `parameters`).
    return tool["function"].get("parameters") or {"type": "object", "properties": {}}


def parse_tools(fields: dict) -> ToolRequest | None:
    """The request's tool fields (tools, tool_choice, parallel_tool_calls, functions, function_call: a
    body or protocol's read fields), or None when it has none. The deprecated `functions` /
    `function_call` arrive here as the tools and tool_choice they were replaced by."""
    tools_value = fields.get("tools")
    choice_value = fields.get("tool_choice")
    legacy = fields.get("functions") is not None
    if legacy:
        if tools_value is not None:
            raise invalid("Pass either 'tools' or the deprecated 'functions', not both", "functions")
        functions = fields["functions"]
        if not isinstance(functions, list):
            raise invalid("'functions' must be an array", "functions")
        tools_value = [{"type": "function", "function": f} for f in functions]
    if fields.get("function_call") is not None:
        if choice_value is not None:
            raise invalid("Pass either 'tool_choice' or the deprecated 'function_call'", "function_call")
        call = fields["function_call"]
        choice_value = {"type": "function", "function": call} if isinstance(call, dict) else call
    if tools_value is None and choice_value is None:
        return None
    tools = _tools(tools_value)
    names = [t["function"]["name"] for t in tools]
    choice, function, allowed = _tool_choice(choice_value, names)
    parallel = fields.get("parallel_tool_calls")
    if parallel is None:
        parallel = True
    if not isinstance(parallel, bool):
        raise invalid("'parallel_tool_calls' must be a boolean", "parallel_tool_calls")
    return ToolRequest(tools, choice, function, parallel and not legacy, legacy, allowed)


def history_tool_calls(calls, where: str) -> list[dict]:
    """An assistant message's tool_calls in the history, checked: [{id, type, function: {name, arguments}}]."""
    if not isinstance(calls, list):
        raise invalid(f"{where} must be an array", where)
    out = []
    for j, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if (
            not isinstance(function, dict)
            or not isinstance(function.get("name"), str)
            or not isinstance(function.get("arguments"), str)
            or call.get("type", "function") != "function"
            or not isinstance(call.get("id", ""), str)
        ):
            raise invalid(
                f"{where}[{j}] must be {{id, type: 'function', function: {{name, arguments: JSON text}}}}",
                where,
            )
        out.append(
            {
                "id": call.get("id", f"call_{j}"),
                "type": "function",
                "function": {"name": function["name"], "arguments": function["arguments"]},
            }
        )
    return out


def _tools(value) -> list[dict]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise invalid("'tools' must be an array of tool objects", "tools")
    tools, seen = [], set()
    for i, tool in enumerate(value):
        where = f"tools[{i}]"
        if not isinstance(tool, dict):
            raise invalid(f"'{where}' must be an object", "tools")
        kind = tool.get("type", "function")
        if kind == "custom":
            raise unsupported("tools", "Custom (free-form) tools")
        if kind != "function":
            raise invalid(f"'{where}.type' must be 'function', got {kind!r}", "tools")
        function = tool.get("function")
        if not isinstance(function, dict):
            raise invalid(f"'{where}.function' must be an object", "tools")
        name = function.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise invalid(
                f"'{where}.function.name' must be 1-64 letters, digits, underscores or dashes, got {name!r}",
                "tools",
            )
        if name in seen:
            raise invalid(f"'tools' names the function {name!r} twice", "tools")
        seen.add(name)
        description = function.get("description")
        if description is not None and not isinstance(description, str):
            raise invalid(f"'{where}.function.description' must be a string", "tools")
        parameters = function.get("parameters")
        if parameters is not None and not isinstance(parameters, dict):
            raise invalid(f"'{where}.function.parameters' must be a JSON schema object", "tools")
        clean = {"name": name}
        if description is not None:
            clean["description"] = description
        if parameters is not None:
            clean["parameters"] = parameters
        if function.get("strict") is not None:
            clean["strict"] = function["strict"]
        tools.append({"type": "function", "function": clean})
    return tools


def _tool_choice(value, names: list[str]) -> tuple[str, str | None, list[str] | None]:
    """-> (choice, the named function, the allowed_tools names)."""
    if value is None:
        return ("auto" if names else "none"), None, None
    if value in ("none", "auto"):
        return value, None, None
    if value == "required":
        if not names:
            raise invalid("tool_choice 'required' needs 'tools'", "tool_choice")
        return value, None, None
    if isinstance(value, dict):
        kind = value.get("type")
        if kind == "allowed_tools":
            return _allowed_tools(value.get("allowed_tools"), names)
        function = value.get("function")
        if kind == "function" and isinstance(function, dict) and isinstance(function.get("name"), str):
            return "function", _offered(function["name"], names), None
    raise invalid(
        "'tool_choice' must be 'none', 'auto', 'required', "
        '{"type": "function", "function": {"name": ...}} or {"type": "allowed_tools", ...}',
        "tool_choice",
    )


def _offered(name: str, names: list[str]) -> str:
    if name not in names:
        offered = ", ".join(names) if names else "none"
        raise invalid(
            f"'tool_choice' names the function {name!r}, which is not in 'tools' (offered: {offered})",
            "tool_choice",
        )
    return name


def _allowed_tools(value, names: list[str]) -> tuple[str, None, list[str]]:
    """allowed_tools: every tool is still shown (the prompt stays the same), only these may be called."""
    if not isinstance(value, dict) or value.get("mode") not in ("auto", "required"):
        raise invalid("'tool_choice.allowed_tools' must have mode 'auto' or 'required'", "tool_choice")
    listed = value.get("tools")
    if not isinstance(listed, list) or not listed:
        raise invalid("'tool_choice.allowed_tools.tools' must be a non-empty array", "tool_choice")
    allowed = []
    for tool in listed:
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise invalid(
                '\'tool_choice.allowed_tools.tools\' items must be {"type": "function", "function": '
                '{"name": ...}}',
                "tool_choice",
            )
        allowed.append(_offered(function["name"], names))
    return value["mode"], None, allowed
