"""Evaluate a model on held-out conversations: loss, perplexity and generation metrics.

    loss        token-weighted mean cross-entropy over the answer tokens (labels != -100) of the
                held-out examples, exactly as the training loop's eval loss
    perplexity  exp(loss)
    generation  the prompt of each held-out conversation (every turn before the last assistant
                turn) is rendered with the training template, answered in batches (left padding,
                greedy unless ``temperature`` > 0), and scored against the last assistant turn
                with ``eval.metrics.score_corpus`` (exact match, BLEU-4, ROUGE-1/2/L, long-answer
                accuracy); ``lookup`` > 0 decodes one prompt at a time with prompt-lookup
                speculative decoding instead (greedy only; the same answers, ``eval.generate``)

``EvalConfig`` holds the knobs; ``peftlab eval`` and the sweep worker both use it (a sweep's
``eval:`` section is an ``EvalConfig``; unknown keys are an error listing the valid ones).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..data.formats import Conversation, PreferencePair
from ..data.preference import PairExample
from ..errors import ConfigError
from ..io import atomic_write_text
from ..model.lookup import check_setting
from .metrics import DEFAULT_LONG_ANSWER_CHARS, score_corpus

# The seeds' side-by-side prompts (their four "fixed prompt" generations).
DEFAULT_PROMPTS = [
    "Give three tips for a good meal.",
    "Write a poem about a delicious night.",
    "Write a tweet describing your capabilities.",
    "Pretend you are an alien visiting Earth. Write three opinions you believe.",
]


@dataclass
class EvalConfig:
    loss: bool = True  # eval loss and perplexity on the held-out examples
    loss_batches: int | None = None  # cap the loss pass at this many batches (None: all)
    generate: bool = True  # generation metrics on the held-out conversations
    limit: int | None = None  # score only the first N held-out conversations (None: all)
    max_new_tokens: int = 128
    batch_size: int = 8
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None  # for sampling
    lookup: int = 0  # prompt-lookup drafts per forward, one prompt at a time, greedy only (0: off, batched)
    long_answer_chars: int = DEFAULT_LONG_ANSWER_CHARS
    prompts: list[str] = field(default_factory=lambda: list(DEFAULT_PROMPTS))  # side-by-side samples
    sample_max_new_tokens: int = 128

    def validate(self) -> None:
        for key in ("max_new_tokens", "batch_size", "sample_max_new_tokens"):
            if getattr(self, key) < 1:
                raise ConfigError(f"eval.{key} must be >= 1, got {getattr(self, key)}")
        if self.limit is not None and self.limit < 0:
            raise ConfigError(f"eval.limit must be >= 0 (or none for all), got {self.limit}")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ConfigError(f"eval.temperature must be >= 0 and eval.top_p in (0, 1]; "
                              f"got {self.temperature}, {self.top_p}")
        check_setting(self.lookup, self.temperature, "eval.lookup / --lookup", "eval.temperature / --temperature")


@dataclass
class EvalResult:
    metrics: dict  # eval_loss, perplexity, loss_tokens, and score_corpus's aggregate
    predictions: list[dict]  # one record per scored conversation


def split_prompt(conv: Conversation) -> tuple[list[dict], str]:
    """(prompt messages, reference answer): everything before the last assistant turn, and that turn
    (for a preference pair: its prompt and the chosen answer)."""
    if isinstance(conv, PreferencePair):
        return conv.prompt, conv.chosen[-1]["content"]
    msgs = conv.messages
    if not msgs or msgs[-1].get("role") != "assistant":
        raise ConfigError(f"{conv.source}: the last message is not an assistant turn, so there is no reference "
                          "answer to score; generation metrics need conversations that end with the answer")
    return msgs[:-1], msgs[-1]["content"]


@torch.no_grad()
def eval_loss(model: nn.Module, examples: list, collate_fn, batch_size: int, amp, max_batches: int | None = None
              ) -> tuple[float, int]:
    """(token-weighted mean loss, label tokens) over ``examples``: training's evaluation."""
    from ..train.evaluate import evaluate_sums

    device = next(model.parameters()).device
    total, count = evaluate_sums(model, examples, batch_size, collate_fn, device, amp, max_batches)
    return total / max(count, 1), count


def generate_answers(model, tokenizer, encoder, prompts: list, cfg: EvalConfig, amp=None,
                     max_new_tokens: int | None = None) -> list[str]:
    """Answers in the order of ``prompts``; batches are formed from prompts of similar length."""
    from ..train.runtime import autocast
    from .generate import generate

    lengths = [len(encoder.prompt_ids(p if isinstance(p, list) else [{"role": "user", "content": p}]))
               for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -lengths[i])
    device = next(model.parameters()).device
    with autocast(device, amp):
        out = generate(model, tokenizer, encoder, [prompts[i] for i in order],
                       max_new_tokens=max_new_tokens or cfg.max_new_tokens, temperature=cfg.temperature,
                       top_p=cfg.top_p, batch_size=cfg.batch_size, seed=cfg.seed, lookup=cfg.lookup)
    answers = [""] * len(prompts)
    for i, a in zip(order, out):
        answers[i] = a
    return answers


def evaluate(model, tokenizer, encoder, records: list[Conversation], examples: list, collate_fn,
             cfg: EvalConfig, amp=None, log=None, pref=None) -> EvalResult:
    """Loss on ``examples`` and generation metrics on ``records`` (the same held-out split); on
    preference pairs, preference accuracy, margin and rewards (``pref``: the run's pref section)."""
    say = log or (lambda *_: None)
    metrics: dict = {}
    if cfg.loss and examples and isinstance(examples[0], PairExample):
        from ..config import PreferenceConfig
        from ..train.pref_setup import preference_eval

        t0 = time.perf_counter()
        metrics.update(preference_eval(model, examples, collate_fn, cfg.batch_size, amp, pref or PreferenceConfig(),
                                       cfg.loss_batches))
        say(f"preference accuracy {100 * metrics.get('pref_accuracy', 0):.1f}%, margin "
            f"{metrics.get('pref_margin', 0):.4f}, rewards chosen {metrics.get('pref_rewards_chosen', 0):.4f} / "
            f"rejected {metrics.get('pref_rewards_rejected', 0):.4f} over {metrics['pref_pairs']} held-out pairs "
            f"(reference: {metrics['pref_reference']}) in {time.perf_counter() - t0:.1f}s")
    elif cfg.loss and examples and not hasattr(examples[0], "labels"):
        say("eval loss: skipped (KTO's unpaired examples have no pairwise metrics)")
    elif cfg.loss and examples:
        t0 = time.perf_counter()
        loss, n = eval_loss(model, examples, collate_fn, cfg.batch_size, amp, cfg.loss_batches)
        metrics.update(eval_loss=loss, perplexity=math.exp(min(loss, 700.0)), loss_tokens=n)
        say(f"eval loss {loss:.4f} (perplexity {metrics['perplexity']:.2f}) over {n} answer tokens "
            f"in {time.perf_counter() - t0:.1f}s")
    predictions: list[dict] = []
    if cfg.generate:
        chosen = records if cfg.limit is None else records[: cfg.limit]
        if chosen:
            pairs = [split_prompt(c) for c in chosen]
            t0 = time.perf_counter()
            preds = generate_answers(model, tokenizer, encoder, [p for p, _ in pairs], cfg, amp)
            refs = [r for _, r in pairs]
            agg, per = score_corpus(preds, refs, cfg.long_answer_chars)
            metrics.update(agg)
            metrics["generation_s"] = round(time.perf_counter() - t0, 2)
            for conv, (prompt, ref), pred, scores in zip(chosen, pairs, preds, per):
                rec = {"source": conv.source, "prompt": prompt[-1]["content"] if prompt else "",
                       "reference": ref, "prediction": pred,
                       "scores": {k: round(v, 6) for k, v in scores.items()},
                       "long": len(" ".join(ref.split())) > cfg.long_answer_chars}
                if len(prompt) > 1:
                    rec["context"] = prompt[:-1]
                predictions.append(rec)
            say(f"generation: {len(chosen)} answers in {metrics['generation_s']:.1f}s; "
                + format_scores(metrics))
    return EvalResult(metrics, predictions)


def format_scores(m: dict) -> str:
    parts = []
    for key, label in (("exact_match", "exact match"), ("bleu4", "BLEU-4"), ("rouge1", "ROUGE-1"),
                       ("rouge2", "ROUGE-2"), ("rougeL", "ROUGE-L")):
        if m.get(key) is not None:
            parts.append(f"{label} {100 * m[key]:.1f}")
    if m.get("long_answer_n"):
        parts.append(f"long-answer accuracy {100 * m['long_answer_accuracy']:.1f} "
                     f"(n={m['long_answer_n']}, > {m['long_answer_chars']} chars)")
    return ", ".join(parts)


def write_eval(out_dir: str | Path, result: EvalResult, extra: dict | None = None) -> Path:
    """metrics.json and predictions.jsonl in ``out_dir`` (each written atomically)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "predictions.jsonl",
                      "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in result.predictions))
    atomic_write_text(out / "metrics.json", json.dumps({**result.metrics, **(extra or {})}, indent=2))
    return out
