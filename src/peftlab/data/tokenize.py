"""Turn rendered segments into token ids and labels.

Each segment is encoded on its own (``add_special_tokens=False``) and the ids concatenated,
so the tokens of a prompt are the same in training and at generation. Labels are the ids on
trained segments and -100 everywhere else; padding is never consulted (pad may equal eos,
and the eos that ends an answer must be learned).
"""

from __future__ import annotations

from dataclasses import dataclass

from .formats import Conversation
from .templates import Renderer

IGNORE = -100


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    source: str = ""
    truncated: bool = False

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def n_labels(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts a BOS token in front when asked for special tokens."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    with_special = tokenizer("a", add_special_tokens=True).input_ids
    without = tokenizer("a", add_special_tokens=False).input_ids
    return with_special[:1] == [bos] and without[:1] != [bos]


def encode_segments(segments: list[tuple[str, bool]], tokenizer, train_on_prompt: bool = False,
                    bos: bool | None = None) -> tuple[list[int], list[int]]:
    ids: list[int] = []
    labels: list[int] = []
    if bos is None:
        bos = adds_bos(tokenizer)
    if bos and not (segments and tokenizer.bos_token and segments[0][0].startswith(tokenizer.bos_token)):
        ids.append(tokenizer.bos_token_id)
        labels.append(IGNORE)
    for text, trained in segments:
        seg = tokenizer(text, add_special_tokens=False).input_ids
        ids.extend(seg)
        labels.extend(seg if (trained or train_on_prompt) else [IGNORE] * len(seg))
    return ids, labels


class Encoder:
    """Conversations -> Examples for one tokenizer, template and length budget."""

    def __init__(self, tokenizer, template: str = "auto", max_length: int = 512, system: str | None = None,
                 train_on_prompt: bool = False):
        self.tokenizer = tokenizer
        self.renderer = Renderer(template, tokenizer, system=system)
        self.max_length = max_length
        self.train_on_prompt = train_on_prompt
        self.bos = adds_bos(tokenizer)

    def encode(self, conv: Conversation) -> Example:
        if conv.messages and conv.messages[0]["role"] == "text":
            ids = self.tokenizer(conv.text, add_special_tokens=False).input_ids
            if self.bos:
                ids = [self.tokenizer.bos_token_id, *ids]
            ids = ids + [self.tokenizer.eos_token_id]
            labels = list(ids)
        else:
            segments = self.renderer.segments(conv.messages, conv.source)
            ids, labels = encode_segments(segments, self.tokenizer, self.train_on_prompt, self.bos)
        truncated = len(ids) > self.max_length
        return Example(ids[: self.max_length], labels[: self.max_length], conv.source, truncated)

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        """Token ids of the generation prompt (the training prefix, token for token)."""
        ids, _ = encode_segments(self.renderer.prompt_segments(messages), self.tokenizer, bos=self.bos)
        return ids
