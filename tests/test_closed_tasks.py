"""The recipe suite's closed tasks: computed answers, and held-out splits that share no phrasing,
no slot value (item) and, for the numbers, no value with the training split."""

from __future__ import annotations

import re

import pytest

from peftlab.data.builtin import builtin_conversations
from peftlab.data.closed_tasks import INTENTS, ITEMS_HELDOUT, ITEMS_TRAIN, chinese_number
from peftlab.errors import DataError


@pytest.mark.parametrize(("n", "zh"), [
    (0, "零"), (3, "三"), (10, "十"), (11, "十一"), (19, "十九"), (20, "二十"), (40, "四十"), (58, "五十八"),
    (100, "一百"), (101, "一百零一"), (110, "一百一十"), (119, "一百一十九"), (205, "二百零五"),
    (340, "三百四十"), (999, "九百九十九")])
def test_chinese_numerals(n, zh):
    assert chinese_number(n) == zh


def test_chinese_numerals_refuse_what_they_cannot_write():
    with pytest.raises(ValueError):
        chinese_number(1000)


def pairs(name):
    return [(c.messages[0]["content"], c.messages[1]["content"]) for c in builtin_conversations(name)]


def phrasing_of(code, prompt, heldout):
    """The phrasing template a prompt was made from (its slots as wildcards)."""
    for template in INTENTS[code][1 if heldout else 0]:
        pattern = re.escape(template).replace(r"\{item\}", "(" + "|".join(ITEMS_HELDOUT + ITEMS_TRAIN) + ")")
        if re.search(pattern.replace(r"\{order\}", r"#\d{5}"), prompt, flags=re.IGNORECASE):
            return template
    return None


def test_codes_split_by_phrasing_and_item():
    train, heldout = pairs("codes"), pairs("codes/heldout")
    assert (len(train), len(heldout)) == (180, 90)
    assert {a for _, a in train} == {a for _, a in heldout} == set(INTENTS)
    for prompt, code in heldout:
        assert phrasing_of(code, prompt, heldout=True), prompt
        assert not any(f" {item}" in prompt for item in ITEMS_TRAIN)
    for prompt, code in train:
        assert phrasing_of(code, prompt, heldout=False), prompt
        assert not any(f" {item}" in prompt for item in ITEMS_HELDOUT)


def test_multicode_answers_name_both_requests_in_order():
    for prompt, answer in pairs("multicode/heldout") + pairs("multicode"):
        first, second = answer.split("; ")
        assert first != second
        held = "heldout" if any(c in prompt for c in ("Besides that", "On top of that")) else ""
        body = prompt.split(": ", 1)[1]
        cut = min(i for i in (body.find(j) for j in (" Also, ", " And ", " Another thing: ", " Besides that, ",
                                                      " On top of that, ")) if i >= 0)
        assert phrasing_of(first, body[:cut], bool(held)) and phrasing_of(second, body[cut:], bool(held))


def test_zh_numbers_hold_out_values_and_phrasings():
    train, heldout = pairs("zh-numbers"), pairs("zh-numbers/heldout")
    number = lambda p: int(re.search(r"\d+", p).group())  # noqa: E731
    assert not {number(p) for p, _ in train} & {number(p) for p, _ in heldout}
    assert all(chinese_number(number(p)) == a for p, a in train + heldout)
    assert not {re.sub(r"\d+", "N", p) for p, _ in train} & {re.sub(r"\d+", "N", p) for p, _ in heldout}


def test_the_tasks_are_the_same_every_time():
    assert pairs("multicode") == pairs("multicode")


def test_an_unknown_builtin_names_the_ones_there_are():
    with pytest.raises(DataError, match="builtin:codes.*builtin:zh-numbers"):
        builtin_conversations("codez")
    with pytest.raises(DataError, match="unknown"):
        builtin_conversations("codes/test")
