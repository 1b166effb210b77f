"""Scores for generated text against references.

exact_match: 1.0 when prediction and reference are equal after stripping surrounding white
space and collapsing inner runs of white space (case and punctuation count).
"""

from __future__ import annotations

import re

_WS = re.compile(r"\s+")


def normalize_space(text: str) -> str:
    return _WS.sub(" ", text).strip()


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_space(prediction) == normalize_space(reference))


def exact_match_rate(predictions: list[str], references: list[str]) -> float:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not references:
        return 0.0
    return sum(exact_match(p, r) for p, r in zip(predictions, references)) / len(references)
