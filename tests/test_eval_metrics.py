"""Generation metrics against hand-worked values and against the reference implementations.

Every expected number below is worked out by hand in the comment above it (n-gram counts,
then the formula from eval/metrics.py's docstring), so a change in tokenisation, smoothing or
aggregation shows up as a failure here.
"""

from __future__ import annotations

import math

import pytest

from peftlab.eval import metrics as M

pytest.importorskip("sacrebleu")
pytest.importorskip("rouge_score")
pytest.importorskip("jieba")


def f1(p: float, r: float) -> float:
    return 2 * p * r / (p + r)


def test_exact_match_normalises_white_space_only():
    assert M.exact_match("  four hundred\n five ", "four hundred five") == 1.0
    assert M.exact_match("Four hundred five", "four hundred five") == 0.0  # case counts
    assert M.exact_match("4:05 PM.", "4:05 PM") == 0.0  # punctuation counts
    assert M.exact_match_rate(["a", "b", "c"], ["a", "x", "c"]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        M.exact_match_rate(["a"], ["a", "b"])


def test_long_answer_accuracy_counts_only_references_longer_than_n():
    refs = ["short", "x" * 10, "y" * 11, "z  z" + "z" * 8]  # lengths 5, 10, 11, 11 after "z  z" -> "z z"
    preds = ["short", "x" * 10, "y" * 11, "wrong"]
    # > 10 characters: refs 2 and 3; pred 2 right, pred 3 wrong -> 1/2
    assert M.long_answer_accuracy(preds, refs, 10) == 0.5
    assert M.long_answer_accuracy(preds, refs, 11) is None  # none is longer than 11
    assert M.is_long("a" * 33, 32) and not M.is_long("a" * 32, 32)


def test_english_sentence_by_hand():
    hyp, ref = "the cat sat on the mat", "the cat is on the mat"
    # unigrams: 5 of 6 hypothesis words match (not "sat")
    # bigrams:  "the cat", "on the", "the mat" -> 3 of 5
    # trigrams: "on the mat" -> 1 of 4
    # 4-grams:  none of 3 -> exp smoothing, first zero order: 1 / (2^1 * 3)
    # lengths equal -> BP = 1
    expected_bleu = (5 / 6 * 3 / 5 * 1 / 4 * 1 / 6) ** 0.25
    assert M.sentence_bleu(hyp, ref) == pytest.approx(expected_bleu, abs=1e-12)
    r = M.rouge(hyp, ref)
    assert r["rouge1"] == pytest.approx(f1(5 / 6, 5 / 6))
    assert r["rouge2"] == pytest.approx(f1(3 / 5, 3 / 5))
    # LCS: "the cat on the mat" = 5 tokens
    assert r["rougeL"] == pytest.approx(f1(5 / 6, 5 / 6))


def test_sentence_bleu_effective_order_and_brevity_penalty():
    # "a dog" vs "a dog barks": the hypothesis has no 3- or 4-grams, so only orders 1 and 2 count
    # (effective order): p1 = 2/2, p2 = 1/1; BP = exp(1 - 3/2).
    assert M.sentence_bleu("a dog", "a dog barks") == pytest.approx(math.exp(1 - 3 / 2), abs=1e-12)
    assert M.sentence_bleu("four hundred five", "four hundred five") == pytest.approx(1.0)
    assert M.sentence_bleu("", "four hundred five") == 0.0
    assert M.sentence_bleu("zebra", "four hundred five") == 0.0  # no match at any order


def test_corpus_bleu_sums_counts_before_the_formula():
    hyps = ["the cat sat on the mat", "a dog"]
    refs = ["the cat is on the mat", "a dog barks"]
    # summed over both: p1 = (5+2)/(6+2), p2 = (3+1)/(5+1), p3 = (1+0)/(4+0), p4 = 0/3 -> 1/(2*3)
    # c = 6 + 2 = 8, r = 6 + 3 = 9 -> BP = exp(1 - 9/8); no effective order at corpus level
    expected = math.exp(1 - 9 / 8) * (7 / 8 * 4 / 6 * 1 / 4 * 1 / 6) ** 0.25
    assert M.corpus_bleu(hyps, refs) == pytest.approx(expected, abs=1e-12)


def test_chinese_is_segmented_with_jieba():
    hyp, ref = "我喜欢吃香蕉", "我喜欢吃苹果"
    assert M.rouge_tokens(hyp) == ["我", "喜欢", "吃", "香蕉"]
    assert M.rouge_tokens(ref) == ["我", "喜欢", "吃", "苹果"]
    # 3 of 4 words match; bigrams 我喜欢, 喜欢吃 match 2 of 3; trigram 我喜欢吃 1 of 2; 4-gram 0 of 1
    # -> exp smoothing 1/(2*1); equal lengths
    assert M.sentence_bleu(hyp, ref) == pytest.approx((3 / 4 * 2 / 3 * 1 / 2 * 1 / 2) ** 0.25, abs=1e-12)
    r = M.rouge(hyp, ref)
    assert r["rouge1"] == pytest.approx(0.75)
    assert r["rouge2"] == pytest.approx(2 / 3)
    assert r["rougeL"] == pytest.approx(0.75)


def test_chinese_with_punctuation_by_hand():
    hyp = "今天天气很好，我们去公园散步。"
    ref = "今天天气不错，我们去公园吧。"
    assert M.bleu_tokens(hyp) == ["今天天气", "很", "好", "，", "我们", "去", "公园", "散步", "。"]
    assert M.bleu_tokens(ref) == ["今天天气", "不错", "，", "我们", "去", "公园", "吧", "。"]
    # BLEU keeps punctuation: unigrams 6/9 (今天天气 ， 我们 去 公园 。); bigrams 3/8 (，我们 我们去 去公园);
    # trigrams 2/7 (，我们去 我们去公园); 4-grams 1/6 (，我们去公园); c = 9 > r = 8 -> BP = 1
    assert M.sentence_bleu(hyp, ref) == pytest.approx((6 / 9 * 3 / 8 * 2 / 7 * 1 / 6) ** 0.25, abs=1e-12)
    # ROUGE drops punctuation: 7 vs 6 words, 4 shared (今天天气 我们 去 公园) -> F1 = 2*4/(7+6)
    assert M.rouge_tokens(hyp) == ["今天天气", "很", "好", "我们", "去", "公园", "散步"]
    assert M.rouge(hyp, ref)["rouge1"] == pytest.approx(8 / 13)
    # LCS 今天天气 我们 去 公园 = 4 -> same F1; bigrams: 我们去, 去公园 of 6 and 5 -> 2*2/(6+5)
    assert M.rouge(hyp, ref)["rougeL"] == pytest.approx(8 / 13)
    assert M.rouge(hyp, ref)["rouge2"] == pytest.approx(4 / 11)


def test_why_segmentation_is_needed():
    # rouge-score's own tokenizer keeps only [a-z0-9]: Chinese text has no tokens and scores 0.
    from rouge_score import rouge_scorer

    plain = rouge_scorer.RougeScorer(["rouge1"]).score("我喜欢吃苹果", "我喜欢吃苹果")
    assert plain["rouge1"].fmeasure == 0.0
    assert M.rouge("我喜欢吃苹果", "我喜欢吃苹果")["rouge1"] == 1.0


def test_mixed_chinese_and_english():
    assert M.rouge_tokens("I love 北京天安门!") == ["i", "love", "北京", "天安门"]
    assert M.bleu_tokens("I love 北京天安门!") == ["I", "love", "北京", "天安门", "!"]


ENGLISH = [
    ("The quick brown fox jumps over the lazy dog.", "A quick brown fox jumped over the lazy dog!"),
    ("It's 3:05 PM, isn't it?", "It is 3:05 PM."),
    ("Paris is the capital of France.", "The capital of France is Paris."),
    ("", "Something."),
]


def test_english_bleu_equals_sacrebleu_13a():
    import sacrebleu

    hyps, refs = [h for h, _ in ENGLISH], [r for _, r in ENGLISH]
    assert M.corpus_bleu(hyps, refs) == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score / 100, abs=1e-12)
    for h, r in ENGLISH:
        assert M.sentence_bleu(h, r) == pytest.approx(sacrebleu.sentence_bleu(h, [r]).score / 100, abs=1e-12)


def test_english_rouge_equals_rouge_score_default():
    from rouge_score import rouge_scorer

    ref_scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"])
    for h, r in ENGLISH:
        theirs = ref_scorer.score(r, h)
        ours = M.rouge(h, r)
        for k in ("rouge1", "rouge2", "rougeL"):
            assert ours[k] == pytest.approx(theirs[k].fmeasure, abs=1e-12)


def test_score_corpus_aggregates():
    preds = ["four hundred five", "3:05 PM", "我喜欢吃香蕉", "nothing like it"]
    refs = ["four hundred five", "3:05 AM", "我喜欢吃苹果", "a much longer reference answer here"]
    agg, per = M.score_corpus(preds, refs, long_answer_chars=16)
    assert [p["exact_match"] for p in per] == [1.0, 0.0, 0.0, 0.0]
    assert agg["n"] == 4 and agg["exact_match"] == 0.25
    for k in ("rouge1", "rouge2", "rougeL"):
        assert agg[k] == pytest.approx(sum(p[k] for p in per) / 4)
    assert agg["bleu4_sentence"] == pytest.approx(sum(p["bleu4"] for p in per) / 4)
    assert agg["bleu4"] == pytest.approx(M.corpus_bleu(preds, refs))
    # longer than 16 characters: "four hundred five" (17) and the last one
    assert agg["long_answer_n"] == 2 and agg["long_answer_accuracy"] == 0.5
