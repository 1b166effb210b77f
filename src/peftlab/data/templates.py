"""Chat templates: render a conversation as text segments, each marked trained or not.

Masking is decided by rendering, never by searching token strings: a template turns the
messages into ordered segments ``(text, trained, weight)``; tokenisation encodes each segment
on its own and labels the trained ones. The prompt rendered for generation is built from the
same segments, so it equals the training-time prefix byte for byte — and token for token.

Built-in templates are format strings (``{content}``, ``{eos}``, ``{bos}``) whose ``user`` and
``tool`` formats end with the assistant header, so that the untrained text before every
answer is exactly the generation prompt:

    alpaca   ### Instruction: / ### Response:          vicuna   BEGINNING OF CONVERSATION: USER: ... ASSISTANT:
    default  Human: ... / Assistant:                   chatml   <|im_start|>role ... <|im_end|>
    qwen     ChatML + Qwen2.5's system prompt and <tool_call>/<tool_response> tags
    llama3   <|start_header_id|>role<|end_header_id|> ... <|eot_id|>
    gemma    <start_of_turn>user/model ... <end_of_turn> (the system prompt opens the first user turn)

``chat`` uses the tokenizer's own Jinja chat template, rendered incrementally (the text up to
each answer with the generation prompt, then with that answer) so its spans come out exactly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import NamedTuple

from ..errors import DataError
from .formats import TRAINED, check_turns

TOOLS_TEXT = ("You can call these tools (JSON schemas):\n{tools}\n"
              'To call one, answer with {"name": <tool name>, "arguments": <arguments object>}.')
QWEN_TOOLS_TEXT = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": '
    "<args-json-object>}\n</tool_call>"
)


@dataclass(frozen=True)
class Template:
    """A text format for conversations.

    prefix:         once at the very start (e.g. ``{bos}``).
    system:         format of the system text (``{content}``); ``default_system`` is used when a
                    conversation has none. With ``system_in_user`` it opens the first user turn.
    user:           a user turn, ending with the assistant header (= the generation prompt).
    assistant:      an answer: the trained part, ending in the stop token.
    sep:            untrained text between an answer and the next turn (none after the last).
    tool_call:      a trained answer that calls a tool (``None``: the template has no tool calls).
    tool:           a tool result, ending with the assistant header (``None``: no tool results).
    tools:          how the tool schemas (``{tools}``, one JSON per line) join the system text.
    strip:          contents are stripped of surrounding whitespace (as Llama 3's and Gemma's
                    Jinja templates do with ``| trim``).
    stop:           strings that end generation besides the tokenizer's eos.
    """

    name: str
    prefix: str = ""
    system: str = "{content}\n\n"
    default_system: str = ""
    user: str = "{content}"
    assistant: str = "{content}{eos}"
    sep: str = ""
    tool_call: str | None = None
    tool: str | None = None
    tools: str = TOOLS_TEXT
    system_in_user: bool = False
    strip: bool = False
    stop: tuple[str, ...] = ()


TEMPLATES: dict[str, Template] = {}


def register_template(t: Template) -> Template:
    TEMPLATES[t.name] = t
    return t


register_template(Template(
    name="alpaca",
    default_system=(
        "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request."
    ),
    user="### Instruction:\n{content}\n\n### Response:\n",
    assistant="{content}{eos}",
    sep="\n\n",
))
# The seeds' format: "BEGINNING OF CONVERSATION: USER: {prompt} ASSISTANT:"
register_template(Template(
    name="vicuna",
    prefix="BEGINNING OF CONVERSATION: ",
    system="{content} ",
    user="USER: {content} ASSISTANT:",
    assistant=" {content}{eos}",
    sep=" ",
))
register_template(Template(
    name="default",
    system="System: {content}\n",
    user="Human: {content}\nAssistant:",
    assistant=" {content}{eos}",
    sep="\n",
    tool_call=" {content}{eos}",
    tool="Observation: {content}\nAssistant:",
))
_CHATML = dict(
    system="<|im_start|>system\n{content}<|im_end|>\n",
    user="<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n",
    assistant="{content}<|im_end|>",
    sep="\n",
    stop=("<|im_end|>",),
)
register_template(Template(
    name="chatml",
    tool_call="{content}<|im_end|>",
    tool="<|im_start|>tool\n{content}<|im_end|>\n<|im_start|>assistant\n",
    **_CHATML,
))
register_template(Template(  # Qwen2.5-Instruct
    name="qwen",
    default_system="You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
    tool_call="<tool_call>\n{content}\n</tool_call><|im_end|>",
    tool="<|im_start|>user\n<tool_response>\n{content}\n</tool_response><|im_end|>\n<|im_start|>assistant\n",
    tools=QWEN_TOOLS_TEXT,
    **_CHATML,
))
register_template(Template(  # Llama 3 / 3.1 Instruct; tool results use 3.1's ipython role
    name="llama3",
    prefix="{bos}",
    system="<|start_header_id|>system<|end_header_id|>\n\n{content}<|eot_id|>",
    user="<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>"
         "<|start_header_id|>assistant<|end_header_id|>\n\n",
    assistant="{content}<|eot_id|>",
    tool_call="{content}<|eot_id|>",
    tool="<|start_header_id|>ipython<|end_header_id|>\n\n{content}<|eot_id|>"
         "<|start_header_id|>assistant<|end_header_id|>\n\n",
    strip=True,
    stop=("<|eot_id|>",),
))
register_template(Template(  # Gemma 2 / 3 instruction-tuned
    name="gemma",
    prefix="{bos}",
    system="{content}\n\n",
    system_in_user=True,
    user="<start_of_turn>user\n{content}<end_of_turn>\n<start_of_turn>model\n",
    assistant="{content}<end_of_turn>",
    sep="\n",
    strip=True,
    stop=("<end_of_turn>",),
))


class Segment(NamedTuple):
    text: str
    trained: bool
    weight: float = 1.0


def _special(tokenizer, attr: str) -> str:
    value = getattr(tokenizer, attr, None)
    return value if isinstance(value, str) else ""


def tools_json(tools: list) -> str:
    return "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)


class Renderer:
    """Renders conversations for one (template, tokenizer) pair."""

    def __init__(self, name: str, tokenizer, system: str | None = None):
        if name == "auto":
            name = "chat" if getattr(tokenizer, "chat_template", None) else "alpaca"
        if name != "chat" and name not in TEMPLATES:
            raise DataError(
                f"data.template {name!r} is unknown; built-in templates: chat (the tokenizer's own), "
                f"{', '.join(sorted(TEMPLATES))}"
            )
        if name == "chat" and not isinstance(getattr(tokenizer, "chat_template", None), str):
            raise DataError(
                "data.template=chat but the tokenizer has no chat template; "
                f"use one of {', '.join(sorted(TEMPLATES))}"
            )
        self.name = name
        self.tokenizer = tokenizer
        self.system = system
        self.template = TEMPLATES.get(name)
        self.eos = _special(tokenizer, "eos_token")
        self.bos = _special(tokenizer, "bos_token")
        source = tokenizer.chat_template if self.template is None else ""
        self._jinja_tools = "tools" in source
        self._jinja_tool_calls = "tool_calls" in source

    # -- public ------------------------------------------------------------------------

    def segments(self, messages: list[dict], where: str = "", tools: list | None = None) -> list[Segment]:
        """The whole conversation as ordered segments; joined, they are the text training sees
        (a built-in template's separator after the last answer is left out)."""
        messages = self._with_system(messages)
        check_turns(messages, where)
        self._check_roles(messages, where)
        if self.template is None:
            return self._chat_segments(messages, where, tools)
        return self._format_segments(messages, tools)

    def render(self, messages: list[dict], tools: list | None = None) -> str:
        """The full text of a conversation (what training sees)."""
        return "".join(s.text for s in self.segments(messages, tools=tools))

    def generation_prompt(self, messages: list[dict], tools: list | None = None) -> str:
        """The text a model continues to answer ``messages`` (which end with a user or tool turn)."""
        return "".join(text for text, _ in self.prompt_segments(messages, tools))

    def prompt_segments(self, messages: list[dict], tools: list | None = None) -> list[tuple[str, bool]]:
        """Segments of the generation prompt, split as in training (for identical tokens)."""
        messages = self._with_system(messages)
        check_turns(messages, "the generation prompt", complete=False)
        self._check_roles(messages, "the generation prompt")
        if self.template is None:
            segs = self._chat_segments(messages, "", tools, prompt_only=True)
        else:
            segs = self._format_segments(messages, tools)
        return [(s.text, False) for s in segs]

    @property
    def stop_strings(self) -> tuple[str, ...]:
        return self.template.stop if self.template else ()

    # -- internals ---------------------------------------------------------------------

    def _with_system(self, messages: list[dict]) -> list[dict]:
        if self.system and not (messages and messages[0]["role"] == "system"):
            return [{"role": "system", "content": self.system}, *messages]
        return list(messages)

    def _check_roles(self, messages: list[dict], where: str) -> None:
        t = self.template
        if t is None:
            return
        for role, fmt in (("tool_call", t.tool_call), ("tool", t.tool)):
            if fmt is None and any(m["role"] == role for m in messages):
                able = sorted(n for n, x in TEMPLATES.items() if x.tool_call and x.tool)
                raise DataError(
                    f"{where}: template {t.name!r} cannot render tool calls and results (role {role!r}, ShareGPT "
                    f"{'function_call' if role == 'tool_call' else 'observation'}); use data.template= one of "
                    f"{', '.join(able)} or chat (the tokenizer's own)"
                )

    def _fill(self, fmt: str, content: str = "") -> str:
        return fmt.replace("{eos}", self.eos).replace("{bos}", self.bos).replace("{content}", content)

    def _system_text(self, messages: list[dict], tools: list | None, default: str) -> tuple[str, list[dict]]:
        system = default
        if messages and messages[0]["role"] == "system":
            system, messages = messages[0]["content"], messages[1:]
        if tools:
            fmt = self.template.tools if self.template else TOOLS_TEXT
            system = "\n\n".join(x for x in (system, fmt.replace("{tools}", tools_json(tools))) if x)
        return system, messages

    def _format_segments(self, messages: list[dict], tools: list | None) -> list[Segment]:
        t = self.template
        clean = (lambda s: s.strip()) if t.strip else (lambda s: s)
        system, body = self._system_text(messages, tools, t.default_system)
        pending = self._fill(t.prefix)
        first_user = ""
        if system:
            if t.system_in_user:
                first_user = self._fill(t.system, system)
            else:
                pending += self._fill(t.system, clean(system))
        out: list[Segment] = []
        for m in body:
            role, content = m["role"], clean(m["content"])
            if role in TRAINED:
                out.append(Segment(pending, False))
                fmt = t.assistant if role == "assistant" else t.tool_call
                out.append(Segment(self._fill(fmt, content), True, m.get("weight", 1.0)))
                pending = self._fill(t.sep)  # dropped if nothing follows: no untrained tail
            elif role == "user":
                pending += self._fill(t.user, first_user + content)
                first_user = ""
            else:  # tool
                pending += self._fill(t.tool, content)
        if pending and not (out and out[-1].trained and pending == self._fill(t.sep)):
            out.append(Segment(pending, False))
        return [s for s in out if s.text]

    # -- the tokenizer's Jinja template ------------------------------------------------

    def _jinja_messages(self, messages: list[dict], tools: list | None) -> tuple[list[dict], list[dict], dict]:
        """(messages with tools described in the system text if the template ignores tools,
        the same in the template's own shape, apply_chat_template kwargs)."""
        kwargs = {}
        if tools and self._jinja_tools:
            kwargs["tools"] = tools
        elif tools:
            system, body = self._system_text(messages, tools, "")
            messages = [{"role": "system", "content": system}, *body]
        out = []
        for m in messages:
            if m["role"] == "tool_call" and self._jinja_tool_calls:
                out.append({"role": "assistant", "content": "",
                            "tool_calls": [{"type": "function", "function": json.loads(m["content"])}]})
            else:
                out.append({"role": "assistant" if m["role"] == "tool_call" else m["role"],
                            "content": m["content"]})
        return messages, out, kwargs

    def _render(self, messages: list[dict], add_generation_prompt: bool, kwargs: dict, where: str = "") -> str:
        try:
            return self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs
            )
        except Exception as e:  # jinja raises its own errors for roles a template refuses
            raise DataError(f"{where}: the tokenizer's chat template cannot render these messages: {e}") from None

    def _chat_segments(self, messages: list[dict], where: str, tools: list | None, prompt_only: bool = False):
        messages, msgs, kwargs = self._jinja_messages(messages, tools)
        out: list[Segment] = []
        done = ""
        for i, m in enumerate(messages):
            if m["role"] not in TRAINED:
                continue
            prompt = self._render(msgs[:i], True, kwargs, where)
            if not prompt.startswith(done):
                raise DataError(
                    f"{where}: the tokenizer's chat template renders earlier turns differently once "
                    "later turns are added, so trained spans cannot be found exactly; use a built-in "
                    f"template ({', '.join(sorted(TEMPLATES))})"
                )
            out.append(Segment(prompt[len(done):], False))
            full = self._render(msgs[: i + 1], False, kwargs, where)
            if not full.startswith(prompt):
                raise DataError(
                    f"{where}: the tokenizer's chat template does not extend the generation prompt "
                    "with the assistant turn; use a built-in template"
                )
            out.append(Segment(full[len(prompt):], True, m.get("weight", 1.0)))
            done = full
        if prompt_only:
            whole = self._render(msgs, True, kwargs, where)
        else:
            whole = self._render(msgs, False, kwargs, where)
        if not whole.startswith(done):
            raise DataError(f"{where}: the tokenizer's chat template renders earlier turns differently once "
                            "later turns are added; use a built-in template")
        out.append(Segment(whole[len(done):], False))
        return [s for s in out if s.text]
