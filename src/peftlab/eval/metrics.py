"""Scores for generated text against references, with exact definitions.

Every score is a fraction in [0, 1] (reports print them x100). ``bleu4``/``rouge*`` need the
``lab`` extra (sacrebleu, rouge-score, jieba); ``exact_match`` needs nothing.

exact_match
    1.0 when prediction and reference are equal after stripping surrounding white space and
    collapsing inner runs of white space to one space; case and punctuation count.

long_answer_accuracy(N)
    exact match averaged over the examples whose reference is longer than N characters (after
    the same white-space normalisation); None when no reference is that long.

Tokens (one definition for every language, so English and Chinese are scored alike)
    Runs of Han characters (CJK unified ideographs) are cut into words with jieba (its default
    dictionary and HMM; deterministic). Everything else is tokenised per metric:
    - BLEU: sacrebleu's ``13a`` tokenizer (mteval-v13a: punctuation split off, case kept), so
      on text without Han characters our BLEU equals ``sacrebleu.corpus_bleu(hyps, [refs])``.
      Chinese punctuation stays a token of its own, as jieba would give it.
    - ROUGE: lower-cased, split at every character that is not a Unicode letter or digit
      (punctuation and ``_`` dropped). On ASCII text this is exactly rouge-score's default
      tokenizer; unlike it, non-ASCII letters survive. (rouge-score's default keeps only
      [a-z0-9], so Chinese text scores 0 against anything; hence the segmentation.)

bleu4 (Papineni et al. 2002), computed by sacrebleu on the tokens above (``tokenize='none'``)
    BLEU = BP * exp( sum_{n=1..4} log(p_n) / 4 ),  BP = min(1, exp(1 - r / c))
    p_n: clipped n-gram matches / hypothesis n-grams; r, c: reference and hypothesis lengths.
    Smoothing ``exp`` (Chen & Cherry 2014, method 3; NIST): the k-th order with zero matches
    gets p_n = 1 / (2^k * total_n). No match at any order gives 0.
    - corpus level (``corpus_bleu``): counts and lengths summed over all examples first.
    - sentence level (``sentence_bleu``): per example, with sacrebleu's *effective order*: orders
      the hypothesis has no n-gram of at all are left out of the mean (a two-word exact answer
      scores 1, not 0). ``bleu4_sentence`` in the aggregate is the mean of these.

rouge1 / rouge2 / rougeL (Lin 2004), F1, computed by rouge-score on the tokens above
    ROUGE-N: P = overlapping n-grams / prediction n-grams, R = ... / reference n-grams (counts
    clipped), F1 = 2PR / (P + R). ROUGE-L: the same with the longest common subsequence length
    in place of the overlap. No stemming. The aggregate is the mean over examples.
"""

from __future__ import annotations

import logging
import re
from functools import lru_cache

from ..errors import PeftlabError

_WS = re.compile(r"\s+")
# CJK unified ideographs: base block, extension A, compatibility block, extensions B-F.
_HAN = re.compile("([\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002ebef]+)")
_NOT_WORD = re.compile(r"[\W_]+")
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")
DEFAULT_LONG_ANSWER_CHARS = 32


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


def is_long(reference: str, min_chars: int) -> bool:
    """Whether ``reference`` counts for long-answer accuracy: more than ``min_chars`` characters."""
    return len(normalize_space(reference)) > min_chars


def long_answer_accuracy(predictions: list[str], references: list[str],
                         min_chars: int = DEFAULT_LONG_ANSWER_CHARS) -> float | None:
    pairs = [(p, r) for p, r in zip(predictions, references) if is_long(r, min_chars)]
    if not pairs:
        return None
    return sum(exact_match(p, r) for p, r in pairs) / len(pairs)


# ---------------------------------------------------------------------------- tokens


def _need(module: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise PeftlabError(
            f"BLEU/ROUGE need the optional package {module.split('.')[0]!r}: "
            "pip install 'peftlab[lab]' (sacrebleu, rouge-score, jieba)"
        ) from None


@lru_cache(maxsize=1)
def _jieba():
    jieba = _need("jieba")
    jieba.setLogLevel(logging.WARNING)  # it announces loading its dictionary otherwise
    return jieba


@lru_cache(maxsize=1)
def _tok13a():
    return _need("sacrebleu.tokenizers.tokenizer_13a").Tokenizer13a()


def _pieces(text: str):
    """(piece, is_han) for the alternating Han / non-Han runs of ``text``."""
    for i, piece in enumerate(_HAN.split(text)):
        if piece:
            yield piece, i % 2 == 1


def _han_words(run: str) -> list[str]:
    return [w for w in _jieba().lcut(run) if w.strip()]


def bleu_tokens(text: str) -> list[str]:
    """Tokens BLEU counts: jieba words for Han runs, 13a tokens elsewhere (case kept)."""
    out: list[str] = []
    for piece, han in _pieces(text):
        out.extend(_han_words(piece) if han else _tok13a()(piece).split())
    return out


def rouge_tokens(text: str) -> list[str]:
    """Tokens ROUGE counts: jieba words for Han runs, lower-cased letter/digit runs elsewhere."""
    out: list[str] = []
    for piece, han in _pieces(text):
        if han:
            out.extend(_han_words(piece))
        else:
            out.extend(t for t in _NOT_WORD.split(piece.lower()) if t)
    return out


# ---------------------------------------------------------------------------- BLEU


@lru_cache(maxsize=2)
def _bleu(sentence: bool):
    sacrebleu = _need("sacrebleu")
    return sacrebleu.BLEU(tokenize="none", smooth_method="exp", effective_order=sentence)


def _joined(text: str) -> str:
    return " ".join(bleu_tokens(text))


def sentence_bleu(prediction: str, reference: str) -> float:
    """Smoothed BLEU-4 of one prediction (effective order), in [0, 1]."""
    return _bleu(True).sentence_score(_joined(prediction), [_joined(reference)]).score / 100.0


def corpus_bleu(predictions: list[str], references: list[str]) -> float:
    """Smoothed corpus BLEU-4 (n-gram counts summed over all examples), in [0, 1]."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not references:
        return 0.0
    hyps = [_joined(p) for p in predictions]
    refs = [_joined(r) for r in references]
    return _bleu(False).corpus_score(hyps, [refs]).score / 100.0


# ---------------------------------------------------------------------------- ROUGE


class _RougeTokenizer:
    """The ``tokenize(text)`` object rouge-score accepts in place of its own tokenizer."""

    def tokenize(self, text: str) -> list[str]:
        return rouge_tokens(text)


@lru_cache(maxsize=1)
def _rouge_scorer():
    rouge_scorer = _need("rouge_score.rouge_scorer")
    return rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=False, tokenizer=_RougeTokenizer())


def rouge(prediction: str, reference: str) -> dict[str, float]:
    """ROUGE-1, ROUGE-2 and ROUGE-L F1 of one prediction: {"rouge1": ..., "rouge2": ..., "rougeL": ...}."""
    scores = _rouge_scorer().score(reference, prediction)  # rouge-score's order: (target, prediction)
    return {k: float(scores[k].fmeasure) for k in ROUGE_TYPES}


# ---------------------------------------------------------------------------- everything at once


def score_example(prediction: str, reference: str) -> dict[str, float]:
    """Per-example scores: exact_match, bleu4 (sentence level), rouge1, rouge2, rougeL."""
    return {"exact_match": exact_match(prediction, reference), "bleu4": sentence_bleu(prediction, reference),
            **rouge(prediction, reference)}


def score_corpus(predictions: list[str], references: list[str],
                 long_answer_chars: int = DEFAULT_LONG_ANSWER_CHARS) -> tuple[dict, list[dict]]:
    """(aggregate, per-example) scores.

    Aggregate keys: n, exact_match, bleu4 (corpus), bleu4_sentence (mean), rouge1, rouge2,
    rougeL (means), long_answer_accuracy (None when no reference is long), long_answer_n,
    long_answer_chars.
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    per = [score_example(p, r) for p, r in zip(predictions, references)]
    n = len(per)

    def mean(key: str) -> float:
        return sum(s[key] for s in per) / n if n else 0.0

    long_n = sum(is_long(r, long_answer_chars) for r in references)
    agg = {"n": n, "exact_match": mean("exact_match"), "bleu4": corpus_bleu(predictions, references),
           "bleu4_sentence": mean("bleu4"), **{k: mean(k) for k in ROUGE_TYPES},
           "long_answer_accuracy": long_answer_accuracy(predictions, references, long_answer_chars),
           "long_answer_n": long_n, "long_answer_chars": long_answer_chars}
    return agg, per
