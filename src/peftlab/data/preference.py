"""Preference data -> token ids and batches: DPO-style pairs and KTO's labelled answers.

A ``PreferencePair`` (prompt, chosen, rejected) becomes a ``PairExample``: the prompt rendered
and tokenised ONCE with the run's template (the generation prompt, token for token), and each
answer's tokens as they follow that prompt in the full rendered conversation (labels on the
answer and its end-of-turn token; earlier answers of a multi-turn prompt are context). A
``LabeledAnswer`` (KTO: prompt, completion, label) becomes a ``LabeledExample`` the same way.

Truncation (the order matters; every cut is counted in ``DataStats.truncated``):

1. ``data.source_length`` / ``data.target_length`` cut each message's content (as for SFT);
2. ``data.max_prompt_length``: a longer prompt keeps its LAST tokens (the question the answers
   reply to sits at the prompt's end; the system prompt at its start goes first);
3. ``data.max_length``: each answer keeps its FIRST ``max_length - prompt`` tokens.

A prompt that leaves no room for a single answer token is an error naming the record (or,
with ``data.overlong=drop``, the record is dropped and counted).

Batches (``collate_pairs``): one forward scores both answers. Rows are the concatenation
``[prompt+chosen_1 .. prompt+chosen_B, prompt+rejected_1 .. prompt+rejected_B]`` [2B, T], right
padded, labels -100 except on answer tokens. ``ref_logps`` [2B] carries precomputed reference
log-probabilities when every example has them. KTO batches (``collate_labeled``) hold the B
completions, their ``kto_label`` [B] and the KL rows ``kl_*`` [B, T']: each prompt with another
example's completion (KTO's estimate of the reference KL term; TRL pairs them the same way).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..errors import DataError
from .collate import collate
from .formats import TRAINED, LabeledAnswer, PreferencePair
from .tokenize import IGNORE, Encoder, Example, encode_segments


@dataclass
class PairExample:
    """A tokenised preference pair. ``ref``: precomputed reference log-probs (chosen, rejected)."""

    prompt: list[int]
    chosen: list[int]
    chosen_labels: list[int]
    rejected: list[int]
    rejected_labels: list[int]
    source: str = ""
    truncated: bool = False
    ref: tuple[float, float] | None = None

    def __len__(self) -> int:  # the longer of the two rows
        return len(self.prompt) + max(len(self.chosen), len(self.rejected))


@dataclass
class LabeledExample:
    """A tokenised KTO example; ``kl_completion`` is another example's answer (the KL row)."""

    prompt: list[int]
    completion: list[int]
    completion_labels: list[int]
    label: bool
    source: str = ""
    truncated: bool = False
    kl_completion: list[int] | None = None
    kl_labels: list[int] | None = None
    ref: tuple[float, float] | None = None  # precomputed reference log-probs (completion, KL row)

    def __len__(self) -> int:
        return len(self.prompt) + max(len(self.completion), len(self.kl_completion or ()))


def _answer_ids(encoder: Encoder, prompt: list[dict], answer: list[dict], tools, source: str
                ) -> tuple[list[int], list[int], list[int], bool]:
    """(prompt ids, answer ids, answer labels, cut by source/target_length) for prompt + answer."""
    messages, cut = encoder._budget(prompt + answer)
    n = len(prompt)
    messages = [{**m, "weight": 0.0} if i < n and m["role"] in TRAINED else m for i, m in enumerate(messages)]
    segments = encoder.renderer.segments(messages, source, tools=tools)
    ids, labels, _ = encode_segments(segments, encoder.tokenizer, False, encoder.bos)
    prompt_ids = encoder.prompt_ids(messages[:n], tools)
    if ids[:len(prompt_ids)] != prompt_ids:
        raise DataError(f"{source}: the template renders the prompt differently alone than before an answer, so the "
                        "answers cannot share one prompt; choose another data.template (e.g. chatml)")
    ids, labels = ids[len(prompt_ids):], labels[len(prompt_ids):]
    while labels and labels[-1] == IGNORE:  # the template's separator after the answer is not scored
        ids, labels = ids[:-1], labels[:-1]
    return prompt_ids, ids, labels, cut


def fit_lengths(prompt: list[int], answers: list[tuple[list[int], list[int]]], data_cfg, source: str
                ) -> tuple[list[int], list[tuple[list[int], list[int]]], bool] | None:
    """The truncation rules of the module docstring; None when ``data.overlong=drop`` drops it."""
    cut = False
    keep = data_cfg.max_prompt_length
    if keep is not None and len(prompt) > keep:
        prompt, cut = prompt[len(prompt) - keep:], True
    room = data_cfg.max_length - len(prompt)
    if room < 1 or any(all(x == IGNORE for x in labels[:room]) for _, labels in answers):
        if data_cfg.overlong == "drop":
            return None
        raise DataError(
            f"{source}: the prompt is {len(prompt)} tokens, so within data.max_length={data_cfg.max_length} no answer "
            "token survives truncation; raise data.max_length, set data.max_prompt_length below it (the prompt "
            "then keeps its last tokens), or drop such records with data.overlong=drop")
    out = []
    for ids, labels in answers:
        cut = cut or len(ids) > room
        out.append((ids[:room], labels[:room]))
    return prompt, out, cut


def encode_pair(pair: PreferencePair, encoder: Encoder, data_cfg) -> PairExample | None:
    """A ``PairExample`` (None: dropped by ``data.overlong=drop``)."""
    p1, c, cl, cut1 = _answer_ids(encoder, pair.prompt, pair.chosen, pair.tools, pair.source)
    p2, r, rl, cut2 = _answer_ids(encoder, pair.prompt, pair.rejected, pair.tools, pair.source)
    assert p1 == p2, "one prompt, rendered once"
    fitted = fit_lengths(p1, [(c, cl), (r, rl)], data_cfg, pair.source)
    if fitted is None:
        return None
    prompt, [(c, cl), (r, rl)], cut = fitted
    if c == r:
        raise DataError(f"{pair.source}: after truncation to data.max_length={data_cfg.max_length} the chosen and "
                        "rejected answers are the same tokens; raise data.max_length or data.target_length")
    return PairExample(prompt, c, cl, r, rl, pair.source, cut or cut1 or cut2)


def encode_labeled(rec: LabeledAnswer, encoder: Encoder, data_cfg) -> LabeledExample | None:
    p, c, cl, cut1 = _answer_ids(encoder, rec.prompt, rec.completion, rec.tools, rec.source)
    fitted = fit_lengths(p, [(c, cl)], data_cfg, rec.source)
    if fitted is None:
        return None
    prompt, [(c, cl)], cut = fitted
    return LabeledExample(prompt, c, cl, rec.label, rec.source, cut or cut1)


def encode_records(records: list, encoder: Encoder, data_cfg, stats) -> list:
    """Pairs and KTO records -> examples; a dropped one is counted in ``stats`` (``DataStats``)."""
    out = []
    for rec in records:
        if isinstance(rec, PreferencePair):
            ex = encode_pair(rec, encoder, data_cfg)
        elif isinstance(rec, LabeledAnswer):
            ex = encode_labeled(rec, encoder, data_cfg)
        else:
            raise DataError(f"{rec.source}: preference data (data.objective=preference) needs prompt/chosen/rejected "
                            "pairs or KTO's prompt/completion/label records; this one is a plain conversation")
        if ex is None:
            stats.dropped_overlong += 1
            continue
        stats.truncated += ex.truncated
        out.append(ex)
    return out


def unpair(examples: list) -> list:
    """Pairs -> KTO's unpaired examples (chosen desirable, rejected undesirable); others unchanged."""
    out = []
    for e in examples:
        if isinstance(e, PairExample):
            out.append(LabeledExample(e.prompt, e.chosen, e.chosen_labels, True, e.source, e.truncated))
            out.append(LabeledExample(e.prompt, e.rejected, e.rejected_labels, False, e.source, e.truncated))
        else:
            out.append(e)
    return out


def with_kl_rows(examples: list[LabeledExample], max_length: int) -> list[LabeledExample]:
    """Each example's KL row: its prompt with the previous example's completion (the first takes
    the last's), cut to ``max_length`` (TRL rotates completions by one the same way)."""
    out = []
    for i, e in enumerate(examples):
        other = examples[i - 1]
        room = max(max_length - len(e.prompt), 1)
        out.append(replace(e, kl_completion=other.completion[:room], kl_labels=other.completion_labels[:room]))
    return out


def _rows(prompts: list[list[int]], answers: list[tuple[list[int], list[int]]], pad_id: int) -> dict:
    examples = [Example(p + a, [IGNORE] * len(p) + lab) for p, (a, lab) in zip(prompts, answers)]
    return collate(examples, pad_id, packed=False)


def collate_pairs(examples: list[PairExample], pad_id: int) -> dict[str, torch.Tensor]:
    """{input_ids, attention_mask, labels} [2B, T]: chosen rows then rejected rows; ``ref_logps``
    [2B] when every pair carries precomputed reference log-probs."""
    prompts = [e.prompt for e in examples] * 2
    answers = [(e.chosen, e.chosen_labels) for e in examples] + [(e.rejected, e.rejected_labels) for e in examples]
    batch = _rows(prompts, answers, pad_id)
    if examples and all(e.ref is not None for e in examples):
        batch["ref_logps"] = torch.tensor([e.ref[0] for e in examples] + [e.ref[1] for e in examples],
                                          dtype=torch.float32)
    return batch


def collate_labeled(examples: list[LabeledExample], pad_id: int) -> dict[str, torch.Tensor]:
    """{input_ids, attention_mask, labels} [B, T], ``kto_label`` [B] (bool), the KL rows
    ``kl_input_ids``/``kl_attention_mask``/``kl_labels`` [B, T'] and, when precomputed,
    ``ref_logps`` [B] and ``ref_kl_logps`` [B]."""
    prompts = [e.prompt for e in examples]
    batch = _rows(prompts, [(e.completion, e.completion_labels) for e in examples], pad_id)
    batch["kto_label"] = torch.tensor([e.label for e in examples], dtype=torch.bool)
    if all(e.kl_completion is not None for e in examples):
        kl = _rows(prompts, [(e.kl_completion, e.kl_labels) for e in examples], pad_id)
        batch.update({f"kl_{k}": v for k, v in kl.items()})
    if examples and all(e.ref is not None for e in examples):
        batch["ref_logps"] = torch.tensor([e.ref[0] for e in examples], dtype=torch.float32)
        batch["ref_kl_logps"] = torch.tensor([e.ref[1] for e in examples], dtype=torch.float32)
    return batch


def collate_preference(examples: list, pad_id: int) -> dict[str, torch.Tensor]:
    """The batch of a list of ``PairExample`` or of ``LabeledExample`` (not a mix)."""
    if all(isinstance(e, PairExample) for e in examples):
        return collate_pairs(examples, pad_id)
    if all(isinstance(e, LabeledExample) for e in examples):
        return collate_labeled(examples, pad_id)
    raise DataError("a batch mixes preference pairs and KTO's labelled answers; give one kind of record per run "
                    "(pairs train KTO too: each becomes a desirable and an undesirable example)")


def is_preference(example) -> bool:
    return isinstance(example, (PairExample, LabeledExample))


def rows_of(example) -> list[tuple[str, Example]]:
    """The rows one example becomes in a batch, named (for ``peftlab data inspect``)."""
    p = example.prompt
    if isinstance(example, PairExample):
        return [("chosen", Example(p + example.chosen, [IGNORE] * len(p) + example.chosen_labels, example.source)),
                ("rejected", Example(p + example.rejected, [IGNORE] * len(p) + example.rejected_labels,
                                     example.source))]
    kind = "desirable" if example.label else "undesirable"
    return [(kind, Example(p + example.completion, [IGNORE] * len(p) + example.completion_labels, example.source))]
