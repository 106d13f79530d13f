"""Chat templates: what a template can render (tools, tool calls in the history, enable_thinking), which
tool-call format it speaks, and rendering OpenAI-shaped messages and tools through it as transformers does."""

import functools
import inspect
import json
from dataclasses import dataclass


class ChatTemplateError(ValueError):
    """A conversation the template cannot render; `param` names the request field at fault."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True, slots=True)
class TemplateFeatures:
    renders_tools: bool  # reads the `tools` variable
    renders_tool_calls: bool  # reads messages' `tool_calls`
    takes_enable_thinking: bool
    tool_call_format: str | None  # the tool-call parser its markup needs: hermes | llama3_json | mistral


# The markup a template writes around calls names the parser its model's output needs (checked in order).
_FORMAT_CUES = (
    ("mistral", ("[TOOL_CALLS]",)),
    ("hermes", ("<tool_call>",)),
    ("llama3_json", ("<|python_tag|>", '"parameters"', "'parameters'")),
)


@functools.lru_cache(maxsize=32)
def template_features(source: str) -> TemplateFeatures:
    """What a Jinja chat template reads, from its syntax tree (jinja2's meta.find_undeclared_variables: a
    template that never reads `tools` cannot show the model any)."""
    import jinja2
    from jinja2 import meta, nodes

    env = jinja2.Environment(extensions=["jinja2.ext.loopcontrols"])
    try:
        tree = env.parse(source)
    except jinja2.TemplateSyntaxError as exc:
        raise ChatTemplateError(f"The chat template does not parse: {exc}", "messages") from None
    variables = meta.find_undeclared_variables(tree)
    attributes = {n.attr for n in tree.find_all(nodes.Getattr)}
    attributes |= {n.arg.value for n in tree.find_all(nodes.Getitem) if isinstance(n.arg, nodes.Const)}
    tool_format = None
    if "tools" in variables:
        for name, cues in _FORMAT_CUES:
            if any(cue in source for cue in cues):
                tool_format = name
                break
    return TemplateFeatures(
        renders_tools="tools" in variables,
        renders_tool_calls="tool_calls" in attributes,
        takes_enable_thinking="enable_thinking" in variables,
        tool_call_format=tool_format,
    )


def template_source(tokenizer, chat_template: str | None, tools: list | None = None) -> str:
    """The template text transformers would render with (a named template set picks `tool_use` for tools)."""
    try:
        return tokenizer.get_chat_template(chat_template, tools)
    except ValueError as exc:
        raise ChatTemplateError(str(exc), "messages") from None


@functools.cache
def _reserved_kwargs() -> frozenset[str]:
    """Names a template kwarg must not take: apply_chat_template's own parameters and the conversation."""
    from transformers import PreTrainedTokenizerBase

    params = inspect.signature(PreTrainedTokenizerBase.apply_chat_template).parameters
    return frozenset(n for n, p in params.items() if p.kind is not p.VAR_KEYWORD) | {"messages"}


def check_template_kwargs(kwargs: dict, param: str = "chat_template_kwargs") -> dict:
    for key in kwargs:
        if not isinstance(key, str) or not key.isidentifier() or key in _reserved_kwargs():
            raise ChatTemplateError(f"'{param}' cannot set {key!r}", param)
    return kwargs


def template_arguments(arguments):
    """An OpenAI tool call's `arguments` (a JSON string) -> the dict chat templates expect (`| tojson`
    of a string would quote it twice); text that is not a JSON object stays as it is."""
    if isinstance(arguments, str):
        try:
            value = json.loads(arguments)
        except ValueError:
            return arguments
        return value if isinstance(value, dict) else arguments
    return arguments


def render(
    tokenizer,
    messages: list[dict],
    *,
    chat_template: str | None = None,
    tools: list[dict] | None = None,
    add_generation_prompt: bool = True,
    template_kwargs: dict | None = None,
    tokenize: bool = False,
):
    """Render messages (tool calls' arguments as dicts) and tools through the template; a conversation
    the template cannot show (tools, tool calls) raises ChatTemplateError naming the field."""
    source = template_source(tokenizer, chat_template, tools)
    features = template_features(source)
    if tools and not features.renders_tools:
        raise ChatTemplateError(
            "This model's chat template cannot render 'tools' (it never reads the tools variable); "
            "serve it with a --chat-template that does",
            "tools",
        )
    for i, message in enumerate(messages):
        if message.get("tool_calls") and not features.renders_tool_calls:
            raise ChatTemplateError(
                f"This model's chat template cannot render the tool calls of messages[{i}]", "messages"
            )
    kwargs = check_template_kwargs(dict(template_kwargs or {}))
    conversation = [_template_message(m) for m in messages]
    return tokenizer.apply_chat_template(
        conversation,
        tools=tools or None,
        chat_template=source,
        add_generation_prompt=add_generation_prompt,
        tokenize=tokenize,
        return_dict=False,
        **kwargs,
    )


def _template_message(message: dict) -> dict:
    calls = message.get("tool_calls")
    if not calls:
        return message
    converted = []
    for call in calls:
        function = dict(call.get("function") or {})
        function["arguments"] = template_arguments(function.get("arguments"))
        converted.append({**call, "function": function})
    return {**message, "tool_calls": converted}
