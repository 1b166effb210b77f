"""Chat templates: render a conversation as text segments, each marked trained or not.

Masking is decided by rendering, never by searching token strings: a template turns the
messages into ordered ``(text, trained)`` segments; tokenisation encodes each segment on its
own and labels the assistant segments. The prompt rendered for generation is built from the
same segments, so it equals the training-time prefix byte for byte — and token for token.

Built-in templates are format strings (``{content}``, ``{eos}``, ``{bos}``); ``chat`` uses the
tokenizer's own Jinja chat template, rendered incrementally (the text up to each assistant
turn with the generation prompt, then with that turn) so its spans come out exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import DataError


@dataclass(frozen=True)
class Template:
    """A text format for conversations.

    prefix:         once at the very start (e.g. ``{bos}``).
    system:         format of a system message (``{content}``); used with default_system when
                    a conversation has none and default_system is not empty.
    user:           format of a user turn; it ends with the assistant header, i.e. exactly the
                    generation prompt (e.g. ``...### Response:\\n``).
    assistant:      format of an assistant turn: the trained part, ending in the stop token.
    sep:            untrained text after each assistant turn, before the next user turn.
    stop:           extra strings that end generation besides the tokenizer's eos.
    """

    name: str
    prefix: str = ""
    system: str = "{content}\n\n"
    default_system: str = ""
    user: str = "{content}"
    assistant: str = "{content}{eos}"
    sep: str = ""
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


def _special(tokenizer, attr: str) -> str:
    value = getattr(tokenizer, attr, None)
    return value if isinstance(value, str) else ""


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
        if name == "chat" and not getattr(tokenizer, "chat_template", None):
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

    # -- public ------------------------------------------------------------------------

    def segments(self, messages: list[dict], where: str = "") -> list[tuple[str, bool]]:
        """The whole conversation as ordered (text, trained) segments."""
        messages = self._with_system(messages)
        self._check_roles(messages, where)
        if self.template is None:
            return self._chat_segments(messages, where)
        return self._format_segments(messages)

    def generation_prompt(self, messages: list[dict]) -> str:
        """The text a model continues to answer ``messages`` (which end with a user turn)."""
        messages = self._with_system(messages)
        if not messages or messages[-1]["role"] != "user":
            raise DataError("a generation prompt needs messages that end with a user turn")
        if self.template is None:
            return self._render(messages, add_generation_prompt=True)
        return "".join(text for text, _ in self._format_segments(messages))

    def prompt_segments(self, messages: list[dict]) -> list[tuple[str, bool]]:
        """Segments of the generation prompt, split as in training (for identical tokens)."""
        messages = self._with_system(messages)
        if self.template is None:
            full = messages + [{"role": "assistant", "content": ""}]
            segs = self._chat_segments(full, "", final_prompt_only=True)
            return segs
        return self._format_segments(messages)

    @property
    def stop_strings(self) -> tuple[str, ...]:
        return self.template.stop if self.template else ()

    # -- internals ---------------------------------------------------------------------

    def _with_system(self, messages: list[dict]) -> list[dict]:
        if self.system and not (messages and messages[0]["role"] == "system"):
            return [{"role": "system", "content": self.system}, *messages]
        return list(messages)

    def _check_roles(self, messages: list[dict], where: str) -> None:
        roles = [m["role"] for m in messages]
        body = roles[1:] if roles and roles[0] == "system" else roles
        if "system" in body:
            raise DataError(f"{where}: a system message may only come first (roles: {roles})")
        for i, role in enumerate(body):
            expected = "user" if i % 2 == 0 else "assistant"
            if role != expected:
                raise DataError(
                    f"{where}: turn {i} has role {role!r} where {expected!r} was expected; "
                    f"conversations alternate user/assistant (roles: {roles})"
                )

    def _fill(self, fmt: str, content: str = "") -> str:
        return fmt.replace("{eos}", self.eos).replace("{bos}", self.bos).replace("{content}", content)

    def _format_segments(self, messages: list[dict]) -> list[tuple[str, bool]]:
        t = self.template
        pending = self._fill(t.prefix)
        out: list[tuple[str, bool]] = []
        system = messages[0]["content"] if messages and messages[0]["role"] == "system" else t.default_system
        if messages and messages[0]["role"] == "system":
            messages = messages[1:]
        if system:
            pending += self._fill(t.system, system)
        for i, m in enumerate(messages):
            if m["role"] == "user":
                if i > 0:
                    pending += self._fill(t.sep)
                pending += self._fill(t.user, m["content"])
            else:
                out.append((pending, False))
                pending = ""
                out.append((self._fill(t.assistant, m["content"]), True))
        if pending:
            out.append((pending, False))
        return out

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        try:
            return self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        except Exception as e:  # jinja raises its own errors for roles a template refuses
            raise DataError(f"the tokenizer's chat template cannot render these messages: {e}") from None

    def _chat_segments(self, messages: list[dict], where: str, final_prompt_only: bool = False):
        out: list[tuple[str, bool]] = []
        done = ""
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prompt = self._render(messages[:i], add_generation_prompt=True)
            if not prompt.startswith(done):
                raise DataError(
                    f"{where}: the tokenizer's chat template renders earlier turns differently once "
                    "later turns are added, so trained spans cannot be found exactly; use a built-in "
                    f"template ({', '.join(sorted(TEMPLATES))})"
                )
            out.append((prompt[len(done):], False))
            if final_prompt_only and i == len(messages) - 1:
                return [s for s in out if s[0]]
            full = self._render(messages[: i + 1], add_generation_prompt=False)
            if not full.startswith(prompt):
                raise DataError(
                    f"{where}: the tokenizer's chat template does not extend the generation prompt "
                    "with the assistant turn; use a built-in template"
                )
            out.append((full[len(prompt):], True))
            done = full
        whole = self._render(messages, add_generation_prompt=False)
        if whole.startswith(done) and whole[len(done):]:
            out.append((whole[len(done):], False))
        return [s for s in out if s[0]]
