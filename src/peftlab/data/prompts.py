"""Prompts with reference answers, from any SFT data set: what GRPO samples completions for.

An SFT example is the template's prompt followed by the labelled answer. Its last run of label
tokens is the last assistant turn: everything before it is the generation prompt (the training
prefix is the inference prompt byte for byte: docs/design.md, data invariants), and that run,
decoded as ``peftlab generate`` decodes a completion (special tokens dropped, stripped), is the
reference answer a reward compares against (``answer``).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import DataError
from .tokenize import IGNORE


@dataclass
class PromptExample:
    """One prompt to complete: its token ids (the generation prompt) and the reference answer."""

    input_ids: list[int]
    answer: str
    source: str = ""

    def __len__(self) -> int:
        return len(self.input_ids)


def last_answer_span(labels: list[int]) -> tuple[int, int] | None:
    """(start, end) of the last contiguous run of label tokens, or None without labels."""
    end = None
    for i in range(len(labels) - 1, -1, -1):
        if labels[i] != IGNORE and end is None:
            end = i + 1
        elif labels[i] == IGNORE and end is not None:
            return i + 1, end
    return (0, end) if end is not None else None


def prompts_from_examples(examples: list, tokenizer, name: str = "the data") -> list[PromptExample]:
    """SFT examples (data/tokenize.Example) -> prompts and reference answers; packed or
    prompt-less rows are refused by name."""
    out = []
    for ex in examples:
        if getattr(ex, "seq_lens", ()):
            raise DataError(f"{ex.source or name}: a packed row holds several prompts; GRPO needs data.packing=false")
        span = last_answer_span(ex.labels)
        if span is None or span[0] == 0:
            raise DataError(f"{ex.source or name}: no prompt before the answer (GRPO generates from a prompt); use "
                            "conversation data (alpaca, sharegpt, messages) rather than plain text")
        start, end = span
        answer = tokenizer.decode(ex.input_ids[start:end], skip_special_tokens=True).strip()
        out.append(PromptExample(list(ex.input_ids[:start]), answer, ex.source))
    return out


def stop_token_ids(tokenizer, encoder) -> set[int]:
    """The end-of-sequence id and every template stop string that is a single token."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    for s in encoder.renderer.stop_strings:
        tok = tokenizer(s, add_special_tokens=False).input_ids
        if len(tok) == 1:
            ids.add(tok[0])
    return ids
