"""Turn rendered segments into token ids, labels and loss weights.

Each segment is encoded on its own (``add_special_tokens=False``) and the ids concatenated,
so the tokens of a prompt are the same in training and at generation. Labels are the ids on
trained segments (every answer of a multi-turn conversation, end-of-turn token included) and
-100 everywhere else; padding is never consulted (pad may equal eos, and the eos that ends an
answer must be learned). A turn's ``weight`` scales its tokens' loss; weight 0 masks it.

Length budgets, in this order:

- ``source_length`` / ``target_length``: each user/tool message's content, and each answer's
  content, is cut to that many tokens (tokenised on its own) before rendering, so the
  template's own tokens (headers, end-of-turn) always survive;
- ``max_length`` with the ``overlong`` policy for what is still too long: ``truncate`` (cut
  the tokens), ``drop_oldest`` (remove the oldest turns, keeping the system prompt, until it
  fits; a last turn still too long is truncated) or ``drop`` (drop the record). Counted.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError, DataError
from .formats import TRAINED, Conversation, PreferencePair
from .templates import Renderer, Segment

IGNORE = -100
OVERLONG = ("truncate", "drop_oldest", "drop")


@dataclass
class Example:
    """One training row. A packed row lists the lengths of its sequences in ``seq_lens``."""

    input_ids: list[int]
    labels: list[int]
    source: str = ""
    truncated: bool = False
    weights: list[float] | None = None  # per-token loss weight; None means 1 everywhere
    seq_lens: tuple[int, ...] = ()  # () = one sequence
    dropped: bool = False  # data.overlong=drop removed it (empty)
    types: tuple[int, ...] = ()  # type label of each sequence (data/sample_types.py); () = unlabelled

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


def encode_segments(segments: list, tokenizer, train_on_prompt: bool = False,
                    bos: bool | None = None) -> tuple[list[int], list[int], list[float] | None]:
    """(ids, labels, weights or None) for rendered segments."""
    ids: list[int] = []
    labels: list[int] = []
    weights: list[float] = []
    if bos is None:
        bos = adds_bos(tokenizer)
    if bos and not (segments and tokenizer.bos_token and segments[0][0].startswith(tokenizer.bos_token)):
        ids.append(tokenizer.bos_token_id)
        labels.append(IGNORE)
        weights.append(1.0)
    weighted = False
    for seg in segments:
        seg = Segment(*seg)
        part = tokenizer(seg.text, add_special_tokens=False).input_ids
        ids.extend(part)
        learn = (seg.trained and seg.weight > 0) or (train_on_prompt and not seg.trained)
        labels.extend(part if learn else [IGNORE] * len(part))
        w = seg.weight if seg.trained else 1.0
        weighted = weighted or (learn and w != 1.0)
        weights.extend([w] * len(part))
    return ids, labels, (weights if weighted else None)


class Encoder:
    """Conversations -> Examples for one tokenizer, template and length budget."""

    def __init__(self, tokenizer, template: str = "auto", max_length: int = 512, system: str | None = None,
                 train_on_prompt: bool = False, *, source_length: int | None = None,
                 target_length: int | None = None, overlong: str = "truncate"):
        if overlong not in OVERLONG:
            raise ConfigError(f"data.overlong {overlong!r} is not one of {', '.join(OVERLONG)}")
        for key, value in (("max_length", max_length), ("source_length", source_length),
                           ("target_length", target_length)):
            if value is not None and value < 1:
                raise ConfigError(f"data.{key} must be >= 1, got {value}")
        self.tokenizer = tokenizer
        self.renderer = Renderer(template, tokenizer, system=system)
        self.max_length = max_length
        self.train_on_prompt = train_on_prompt
        self.source_length, self.target_length, self.overlong = source_length, target_length, overlong
        self.bos = adds_bos(tokenizer)

    # -- conversations -----------------------------------------------------------------

    def encode(self, conv: Conversation) -> Example:
        if conv.is_text:
            ids = self.document_ids(conv.text)
            cut = len(ids) > self.max_length
            return Example(ids[: self.max_length], ids[: self.max_length], conv.source, cut)
        messages, cut = self._budget(conv.messages)
        ids, labels, weights = self._encode_messages(messages, conv)
        if len(ids) > self.max_length and self.overlong == "drop":
            return Example([], [], conv.source, dropped=True)
        if len(ids) > self.max_length and self.overlong == "drop_oldest":
            while len(ids) > self.max_length and sum(m["role"] == "user" for m in messages) > 1:
                messages = drop_oldest_turn(messages)
                ids, labels, weights = self._encode_messages(messages, conv)
                cut = True
        if len(ids) > self.max_length:
            n = self.max_length
            ids, labels, weights, cut = ids[:n], labels[:n], (weights[:n] if weights else None), True
        return Example(ids, labels, conv.source, cut, weights)

    def encode_pair(self, pair: PreferencePair) -> tuple[Example, Example]:
        """(chosen, rejected) examples: identical prompt tokens (earlier answers in a multi-turn
        prompt are context, not labels), labels on the two answers only."""
        out = []
        for conv in pair.conversations():
            n = len(pair.prompt)
            messages = [{**m, "weight": 0.0} if i < n and m["role"] in TRAINED else m
                        for i, m in enumerate(conv.messages)]
            ex = self.encode(Conversation(messages, conv.source, conv.extra, conv.tools))
            out.append(Example(ex.input_ids, ex.labels, ex.source, ex.truncated, None, (), ex.dropped))
        return out[0], out[1]

    def prompt_ids(self, messages: list[dict], tools: list | None = None) -> list[int]:
        """Token ids of the generation prompt (the training prefix, token for token)."""
        ids, _, _ = encode_segments(self.renderer.prompt_segments(messages, tools), self.tokenizer, bos=self.bos)
        return ids

    def _encode_messages(self, messages: list[dict], conv: Conversation):
        segments = self.renderer.segments(messages, conv.source, tools=conv.tools)
        return encode_segments(segments, self.tokenizer, self.train_on_prompt, self.bos)

    def _budget(self, messages: list[dict]) -> tuple[list[dict], bool]:
        out, cut_any = [], False
        for m in messages:
            limit = {"user": self.source_length, "tool": self.source_length,
                     "assistant": self.target_length}.get(m["role"])
            if limit is not None:
                text, cut = self.cut_text(m["content"], limit)
                if cut:
                    m, cut_any = {**m, "content": text}, True
            out.append(m)
        return out, cut_any

    def cut_text(self, text: str, limit: int) -> tuple[str, bool]:
        """The longest prefix of ``text`` (at a token boundary) that is at most ``limit`` tokens."""
        fast = getattr(self.tokenizer, "is_fast", False)
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=fast)
        if len(enc.input_ids) <= limit:
            return text, False
        n = limit
        while n > 0:
            cut = text[: enc["offset_mapping"][n][0]] if fast else self.tokenizer.decode(enc.input_ids[:n])
            if len(self.tokenizer(cut, add_special_tokens=False).input_ids) <= limit and text.startswith(cut):
                return cut, True
            n -= 1
        return "", True

    # -- documents (pre-training) ------------------------------------------------------

    def document_ids(self, text: str) -> list[int]:
        """A document's ids for causal LM training: [bos] + tokens + [eos]."""
        eos = self.tokenizer.eos_token_id
        if eos is None:
            raise DataError("the tokenizer has no eos token to end documents with; set one (model.tokenizer)")
        ids = self.tokenizer(text, add_special_tokens=False).input_ids
        return ([self.tokenizer.bos_token_id] if self.bos else []) + ids + [eos]


def drop_oldest_turn(messages: list[dict]) -> list[dict]:
    """Remove the first user turn and the answers to it (a leading system message stays)."""
    starts = [i for i, m in enumerate(messages) if m["role"] == "user"]
    return messages[: starts[0]] + messages[starts[1]:]
