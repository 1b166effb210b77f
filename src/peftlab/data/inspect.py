"""What ``peftlab data inspect`` shows: a rendered example with its trained spans marked, the
token-length histogram, the record counts, and the padding a batch would carry with and
without packing (measured on the real batches the sampler would form, not estimated).
"""

from __future__ import annotations

from dataclasses import dataclass

from .dataset import Datasets
from .packing import best_fit_decreasing, epoch_order, grouped_batches, padding_waste
from .preference import is_preference, rows_of
from .tokenize import IGNORE, Example

GREEN, DIM, RESET = "\x1b[32m", "\x1b[2m", "\x1b[0m"


def highlight(example: Example, tokenizer, color: bool) -> str:
    """The example's text; trained spans in green (or between ⟦ and ⟧ without colour)."""
    out, span, trained = [], [], None

    def flush():
        if not span:
            return
        text = tokenizer.decode(span)
        if trained:
            out.append(f"{GREEN}{text}{RESET}" if color else f"⟦{text}⟧")
        else:
            out.append(f"{DIM}{text}{RESET}" if color else text)

    for tok, lab in zip(example.input_ids, example.labels):
        is_trained = lab != IGNORE
        if is_trained != trained:
            flush()
            span, trained = [], is_trained
        span.append(tok)
    flush()
    return "".join(out)


def histogram(lengths: list[int], bins: int = 12, width: int = 40) -> list[str]:
    """Text histogram lines: ``[lo, hi)  count  bar``."""
    if not lengths:
        return []
    lo, hi = min(lengths), max(lengths)
    step = max(1, -(-(hi - lo + 1) // bins))
    counts = [0] * bins
    for n in lengths:
        counts[min(bins - 1, (n - lo) // step)] += 1
    top = max(counts)
    lines = []
    for i, c in enumerate(counts):
        a = lo + i * step
        if a > hi:
            break
        bar = "█" * max(1 if c else 0, round(width * c / top))
        lines.append(f"  {a:>6}-{a + step - 1:<6} {c:>7}  {bar}")
    return lines


@dataclass
class Waste:
    label: str
    rows: int
    pad: int
    total: int

    @property
    def fraction(self) -> float:
        return self.pad / self.total if self.total else 0.0


def random_batches(n: int, batch_size: int, seed: int) -> list[list[int]]:
    """Epoch 0's batches as the default sampler cuts them (ragged tail dropped)."""
    order = epoch_order(n, seed, 0, True)
    return [order[i:i + batch_size] for i in range(0, n // batch_size * batch_size, batch_size)]


def padding_report(examples: list[Example], batch_size: int, capacity: int, seed: int) -> list[Waste]:
    """Padding in one epoch of batches of ``batch_size`` rows: random order, length-grouped
    order, and packed rows (best-fit-decreasing into ``capacity``) in random order."""
    lengths = [len(e) for e in examples]
    out = []
    if len(lengths) >= batch_size:
        out.append(Waste("no packing, random batches", len(lengths),
                         *padding_waste(lengths, random_batches(len(lengths), batch_size, seed))))
        grouped = grouped_batches(lengths, batch_size, seed, 0)
        out.append(Waste("no packing, data.group_by_length", len(lengths), *padding_waste(lengths, grouped)))
    rows = [sum(lengths[i] for i in r) for r in best_fit_decreasing(lengths, capacity)]
    if len(rows) >= batch_size:
        out.append(Waste(f"packing into rows of {capacity}", len(rows),
                         *padding_waste(rows, random_batches(len(rows), batch_size, seed))))
    return out


def report(data: Datasets, tokenizer, batch_size: int, capacity: int, seed: int, index: int = 0,
           color: bool = False) -> str:
    """The full ``peftlab data inspect`` text (``data`` built without packing)."""
    s = data.stats
    lines = [f"data: {s.summary()}"]
    for name, n in s.per_dataset.items():
        lines.append(f"  {name}: {n} records")
    for msg in s.bad.examples:
        lines.append(f"  skipped: {msg}")
    lines.append(f"template: {data.encoder.renderer.name}; objective: {s.objective}")
    if data.train:
        ex = data.train[min(index, len(data.train) - 1)]
        mark = "green" if color else "⟦ ⟧"
        if is_preference(ex):  # one prompt, each answer scored after it: the rows a batch holds
            for name, row in rows_of(ex):
                lines += ["", f"example {min(index, len(data.train) - 1)}, {name} row ({ex.source}; {len(row)} tokens, "
                              f"{row.n_labels} scored, marked {mark}):", highlight(row, tokenizer, color)]
        else:
            lines += ["", f"example {min(index, len(data.train) - 1)} ({ex.source}; {len(ex)} tokens, "
                          f"{ex.n_labels} trained, marked {mark}):", highlight(ex, tokenizer, color)]
    lengths = [len(e) for e in data.train]
    if lengths:
        lines += ["", f"token lengths of {len(lengths)} training rows (min {min(lengths)}, "
                      f"median {sorted(lengths)[len(lengths) // 2]}, max {max(lengths)}):", *histogram(lengths)]
    if s.objective == "sft":
        lines += ["", f"padding waste, batch {batch_size} (padding / all tokens in the batches):"]
        for w in padding_report(data.train, batch_size, capacity, seed):
            lines.append(f"  {w.label:<34} {w.rows:>6} rows  {w.fraction:7.2%}  ({w.pad:,} of {w.total:,} tokens)")
    return "\n".join(lines)
