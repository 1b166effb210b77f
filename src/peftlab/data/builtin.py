"""Built-in data written by peftlab itself: short tasks whose answers can be checked exactly.

``builtin:tasks`` is the quickstart's default: six kinds of short transformation (numbers to
words, 24-hour to 12-hour time, sorting, two-digit addition, upper-casing, reversing word
order), generated deterministically from a seed. Every answer is computed, so exact match
is a fair score and no data has to be downloaded. The recipe suite's closed tasks, whose held-out
split is phrased differently (``builtin:codes``, ``builtin:multicode``, ``builtin:zh-numbers``), are
in ``closed_tasks.py``.
"""

from __future__ import annotations

import random

from ..errors import DataError
from .formats import Conversation

ONES = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen " \
       "sixteen seventeen eighteen nineteen".split()
TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
WORDS = ("apple river stone cloud green happy quiet orange window silver music garden yellow paper "
         "bright forest candle purple simple winter tiger ocean pencil summer").split()


def number_words(n: int) -> str:
    """0..999 in English words, e.g. 347 -> 'three hundred forty-seven'."""
    if not 0 <= n <= 999:
        raise ValueError(n)
    if n < 20:
        return ONES[n]
    if n < 100:
        return TENS[n // 10] + ("" if n % 10 == 0 else "-" + ONES[n % 10])
    rest = n % 100
    return ONES[n // 100] + " hundred" + ("" if rest == 0 else " " + number_words(rest))


def _numbers_to_words(rng: random.Random) -> tuple[str, str]:
    n = rng.randint(0, 999)
    return f"Write the number {n} in words.", number_words(n)


def _time_12h(rng: random.Random) -> tuple[str, str]:
    h, m = rng.randint(0, 23), rng.randint(0, 59)
    suffix = "AM" if h < 12 else "PM"
    return f"Convert {h:02d}:{m:02d} to 12-hour time.", f"{(h % 12) or 12}:{m:02d} {suffix}"


def _sort(rng: random.Random) -> tuple[str, str]:
    xs = rng.sample(range(1, 100), rng.randint(3, 5))
    return f"Sort in ascending order: {', '.join(map(str, xs))}", ", ".join(map(str, sorted(xs)))


def _add(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return f"What is {a} + {b}?", str(a + b)


def _upper(rng: random.Random) -> tuple[str, str]:
    words = rng.sample(WORDS, rng.randint(2, 4))
    return f"Uppercase: {' '.join(words)}", " ".join(words).upper()


def _reverse(rng: random.Random) -> tuple[str, str]:
    words = rng.sample(WORDS, rng.randint(3, 5))
    return f"Reverse the order of the words: {' '.join(words)}", " ".join(reversed(words))


TASKS = [_numbers_to_words, _time_12h, _sort, _add, _upper, _reverse]


def task_pairs(n: int = 3000, seed: int = 1234) -> list[tuple[str, str]]:
    """n distinct (prompt, answer) pairs, the task kinds interleaved."""
    rng = random.Random(seed)
    seen: set[str] = set()
    out = []
    while len(out) < n:
        prompt, answer = TASKS[len(out) % len(TASKS)](rng)
        if prompt in seen:
            continue
        seen.add(prompt)
        out.append((prompt, answer))
    return out


BUILTIN = "builtin:tasks, builtin:codes, builtin:multicode, builtin:zh-numbers (each also /heldout)"


def builtin_conversations(name: str) -> list[Conversation]:
    from .closed_tasks import closed_task_conversations

    closed = closed_task_conversations(name)
    if closed is not None:
        return closed
    if name != "tasks":
        raise DataError(f"data.path 'builtin:{name}' is unknown; the built-in datasets are {BUILTIN}")
    return [
        Conversation([{"role": "user", "content": p}, {"role": "assistant", "content": a}], f"builtin:tasks record {i}")
        for i, (p, a) in enumerate(task_pairs())
    ]
