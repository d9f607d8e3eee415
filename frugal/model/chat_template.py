"""Render Hugging Face chat templates (jinja2) into prompt text.

The environment mirrors transformers' `apply_chat_template`: an immutable sandbox (templates from the
Hub are untrusted code), `trim_blocks` and `lstrip_blocks`, the loop-control extension, a `tojson`
filter that does not HTML-escape and keeps non-ASCII, and the globals `raise_exception` and
`strftime_now`. Templates see `messages`, `add_generation_prompt`, `tools`, `documents` and the
tokenizer's special-token strings (`bos_token`, `eos_token`, ...).

Always true: a user mistake (no template, malformed messages, a template that raises) ends as an
InvalidRequestError naming the problem, never as a jinja2 exception.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from frugal.errors import InvalidRequestError

logger = logging.getLogger(__name__)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (HF's assistant-mask marker): renders its body."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


@functools.lru_cache(maxsize=16)
def compile_chat_template(template: str) -> jinja2.Template:
    """Compile once per distinct template text (cached)."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as exc:
        raise InvalidRequestError(f"the chat template does not parse: {exc}") from exc


def _check_messages(messages: Any) -> list[dict[str, Any]]:
    if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)):
        raise InvalidRequestError(
            f"messages must be a list of {{role, content}} dicts, got {messages!r:.200}")
    checked = []
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise InvalidRequestError(f"messages[{index}] must be a dict, got {message!r:.200}")
        if not isinstance(message.get("role"), str):
            raise InvalidRequestError(f"messages[{index}] needs a string 'role', got {message!r:.200}")
        if "content" not in message and "tool_calls" not in message:
            raise InvalidRequestError(f"messages[{index}] needs 'content', got {message!r:.200}")
        checked.append(dict(message))
    return checked


def render_chat_template(
    template: str | None,
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool = True,
    special_tokens: Mapping[str, str] | None = None,
    tools: list[dict[str, Any]] | None = None,
) -> str:
    """The prompt text for `messages` under `template`, as HF `apply_chat_template(tokenize=False)`.

    `special_tokens` maps names such as "bos_token" to their strings; a name left out is undefined in
    the template (renders as ""), as in HF when the tokenizer has no such token.
    """
    if template is None:
        raise InvalidRequestError(
            "this model's tokenizer has no chat template; send a plain prompt (completions) instead"
        )
    checked = _check_messages(messages)
    compiled = compile_chat_template(template)
    variables: dict[str, Any] = dict(special_tokens or {})
    variables.update(
        messages=checked, add_generation_prompt=add_generation_prompt, tools=tools, documents=None)
    try:
        return compiled.render(**variables)
    except jinja2.exceptions.TemplateError as exc:
        raise InvalidRequestError(f"the chat template rejected the messages: {exc}") from exc
    except (TypeError, ValueError, KeyError, IndexError, AttributeError) as exc:
        raise InvalidRequestError(f"the chat template failed on these messages: {exc!r}") from exc
