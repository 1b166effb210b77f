"""Verifiable rewards for GRPO: built-in checks and the user's own Python functions.

``grpo.rewards`` names each one; ``grpo.reward_weights`` weighs them (the advantage is computed
from the weighted sum, as in TRL). A reward is called once per completion with keywords, of
which it takes the ones its signature names (or all of them, with ``**kwargs``):

    completion         the generated text (special tokens dropped, stripped: as ``peftlab generate``)
    answer             the record's reference answer (the SFT data's last assistant turn)
    prompt             the prompt as the model saw it (template included)
    completion_tokens  how many tokens the completion has (its end-of-turn token included)
    max_tokens         grpo.max_completion_length

and returns a number. Built-ins:

    exact_match    1 when completion == answer after collapsing white space (eval's exact match)
    numeric_match  1 when the last number in the completion equals the first in the answer
    format         1 when the completion matches grpo.format_pattern (re.fullmatch, DOTALL)
    length_penalty -completion_tokens / max_tokens (in [-1, 0]: shorter is better)

A user's function is ``module:function`` (importable) or ``path/to/file.py:function``. One that
raises, or returns anything but a finite number, stops the run with ``RewardError`` naming the
function, the record and the value.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import numbers
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ConfigError, PeftlabError

_WS = re.compile(r"\s+")
_NUMBER = re.compile(r"[-+]?(?:\d+(?:[.,]\d+)*(?:\.\d+)?|\.\d+)(?:[eE][-+]?\d+)?")


class RewardError(PeftlabError):
    """A reward function raised or returned something that is not a finite number."""


def _space(text: str) -> str:
    return _WS.sub(" ", text).strip()


def exact_match(completion: str, answer: str) -> float:
    return float(_space(completion) == _space(answer))


def _numbers(text: str) -> list[float]:
    out = []
    for m in _NUMBER.findall(text):
        try:
            out.append(float(m.replace(",", "")))
        except ValueError:
            continue
    return out


def numeric_match(completion: str, answer: str) -> float:
    got, want = _numbers(completion), _numbers(answer)
    if not got or not want:
        return 0.0
    return float(math.isclose(got[-1], want[0], rel_tol=1e-9, abs_tol=1e-9))


def length_penalty(completion_tokens: int, max_tokens: int) -> float:
    return -completion_tokens / max(max_tokens, 1)


@dataclass
class Reward:
    name: str
    fn: Callable
    weight: float
    takes: tuple[str, ...] | None  # the keywords it accepts (None: all, it has **kwargs)


KEYWORDS = ("completion", "answer", "prompt", "completion_tokens", "max_tokens")


def _load_user_function(spec: str) -> Callable:
    where, _, name = spec.rpartition(":")
    if not where or not name:
        raise ConfigError(f"grpo.rewards: {spec!r} is neither a built-in ({', '.join(BUILTIN)}) nor "
                          "module:function / path/to/file.py:function")
    try:
        if where.endswith(".py"):
            path = Path(where)
            if not path.is_file():
                raise ConfigError(f"grpo.rewards: {spec!r}: no file {path}")
            loaded = importlib.util.spec_from_file_location(f"peftlab_reward_{path.stem}", path)
            module = importlib.util.module_from_spec(loaded)
            loaded.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure to import is the user's to fix; say which
        raise ConfigError(f"grpo.rewards: {spec!r}: importing {where} failed: {type(e).__name__}: {e}") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ConfigError(f"grpo.rewards: {spec!r}: {where} has no function {name!r}")
    return fn


def _format(pattern: str | None) -> Callable:
    if pattern is None:
        raise ConfigError("grpo.rewards names `format` but grpo.format_pattern is not set; give the regex a "
                          "completion must match, e.g. grpo.format_pattern='^[A-Z][a-z]+$'")
    try:
        regex = re.compile(pattern, re.DOTALL)
    except re.error as e:
        raise ConfigError(f"grpo.format_pattern {pattern!r} is not a valid regular expression: {e}") from None
    return lambda completion: float(regex.fullmatch(completion) is not None)


BUILTIN = ("exact_match", "numeric_match", "format", "length_penalty")


def build_rewards(cfg) -> list[Reward]:
    """The rewards ``cfg`` (GRPOConfig) names, each with its weight."""
    weights = cfg.reward_weights or [1.0] * len(cfg.rewards)
    out = []
    for spec, w in zip(cfg.rewards, weights):
        if spec == "format":
            fn = _format(cfg.format_pattern)
        elif spec in BUILTIN:
            fn = globals()[spec]
        else:
            fn = _load_user_function(spec)
        params = inspect.signature(fn).parameters.values()
        takes = None if any(p.kind is p.VAR_KEYWORD for p in params) else tuple(
            p.name for p in params if p.name in KEYWORDS)
        out.append(Reward(spec, fn, float(w), takes))
    return out


def score(rewards: list[Reward], samples: list[dict]) -> torch.Tensor:
    """[R, F] float64: reward f of completion r. ``samples`` hold ``KEYWORDS`` and ``source``."""
    table = torch.zeros(len(samples), len(rewards), dtype=torch.float64)
    for r, s in enumerate(samples):
        for f, rw in enumerate(rewards):
            kwargs = {k: s[k] for k in KEYWORDS} if rw.takes is None else {k: s[k] for k in rw.takes}
            where = f"reward {rw.name!r} on record {s.get('source') or r} (completion {s['completion']!r})"
            try:
                value = rw.fn(**kwargs)
            except Exception as e:  # noqa: BLE001 - the user's function: report it, not the loop's traceback
                raise RewardError(f"{where} raised {type(e).__name__}: {e}") from None
            if not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise RewardError(f"{where} returned {value!r}; a reward must return a finite number")
            table[r, f] = float(value)
    return table


def weights(rewards: list[Reward]) -> torch.Tensor:
    return torch.tensor([r.weight for r in rewards], dtype=torch.float64)
