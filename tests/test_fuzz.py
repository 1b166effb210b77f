"""Fuzzing the two doors bad input comes through: data files and configs.

Seeded random corruptions of valid files (byte flips, truncation, invalid UTF-8, NUL bytes,
deep nesting, wrong types, huge and empty values, wrong extensions) and random configs (YAML
files and ``key=value`` overrides with values of every type). Each case must end in one of two
ways, within a time limit:

- a ``PeftlabError`` (never another exception type, never a hang), or
- success that is not garbage: a .json/.jsonl file that does not parse as JSON cannot load (other
  suffixes may be other formats: .txt is plain text), and a config that loads has the values the
  loop relies on in range.

Data goes through ``build_datasets`` behind the loop's guard (``peftlab.train.setup.load_data``,
exactly what ``peftlab train`` runs); configs through ``load_config`` and the loop's input
checks. Cases that failed for reasons found along the way are pinned at the bottom.
"""

from __future__ import annotations

import json
import math
import random
import signal
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from conftest import tokenizer_for
from peftlab.config import DataConfig, TrainConfig
from peftlab.configure import load_config
from peftlab.errors import PeftlabError
from peftlab.train.setup import check_inputs, load_data

N_DATA, N_CONFIG = 600, 600


@contextmanager
def time_limit(seconds: int, what: str):
    def fire(signum, frame):
        raise TimeoutError(f"hung for {seconds}s on {what}")

    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


# ---------------------------------------------------------------------------- data files


def valid_records(r: random.Random, n: int) -> list[dict]:
    kind = r.choice(["alpaca", "messages", "text"])
    out = []
    for _i in range(n):
        a, b = r.randint(0, 99), r.randint(0, 99)
        if kind == "alpaca":
            out.append({"instruction": f"Add {a} and {b}.", "input": "", "output": str(a + b)})
        elif kind == "messages":
            out.append({"messages": [{"role": "user", "content": f"{a}+{b}?"},
                                     {"role": "assistant", "content": str(a + b)}]})
        else:
            out.append({"text": f"{a} plus {b} is {a + b}. " * r.randint(1, 3)})
    return out


WEIRD_VALUES = [None, 0, -1, 1e308, True, [], {}, [1, [2]], {"a": {"b": None}}, "", " ", "\x00",
                "\ud800".encode("utf-8", "surrogatepass").decode("utf-8", "replace"), "x" * 20000,
                "🙂" * 50, {"role": "user"}, [{"role": "user"}], [{"role": "wizard", "content": "x"}],
                [{"role": "assistant", "content": 5}], float("nan")]


def mutate_records(r: random.Random, recs: list[dict]) -> None:
    """Structural damage that stays valid JSON."""
    for _ in range(r.randint(1, 3)):
        i = r.randrange(len(recs))
        choice = r.random()
        if not isinstance(recs[i], dict) or choice < 0.15:
            recs[i] = r.choice(WEIRD_VALUES)
        elif choice < 0.7 and recs[i]:
            recs[i][r.choice(list(recs[i]))] = r.choice(WEIRD_VALUES)
        elif choice < 0.85 and recs[i]:
            del recs[i][r.choice(list(recs[i]))]
        else:
            recs[i][r.choice(["instruction", "messages", "text", "junk"])] = r.choice(WEIRD_VALUES)


def mutate_bytes(r: random.Random, raw: bytes) -> bytes:
    """Damage below the JSON level."""
    b = bytearray(raw)
    kind = r.choice(["flip", "truncate", "insert", "utf8", "nul", "dup_line", "drop_line", "bom", "crlf"])
    if kind == "flip":
        for _ in range(r.randint(1, 8)):
            b[r.randrange(len(b))] = r.randrange(256)
    elif kind == "truncate":
        b = b[: r.randrange(len(b))]
    elif kind == "insert":
        pos = r.randrange(len(b) + 1)
        b[pos:pos] = bytes(r.randrange(256) for _ in range(r.randint(1, 16)))
    elif kind == "utf8":
        pos = r.randrange(len(b) + 1)
        b[pos:pos] = r.choice([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80"])
    elif kind == "nul":
        pos = r.randrange(len(b) + 1)
        b[pos:pos] = b"\x00" * r.randint(1, 4)
    elif kind in ("dup_line", "drop_line"):
        lines = bytes(b).split(b"\n")
        i = r.randrange(len(lines))
        if kind == "dup_line":
            lines.insert(i, lines[i])
        else:
            del lines[i]
        b = bytearray(b"\n".join(lines))
    elif kind == "bom":
        b[0:0] = b"\xef\xbb\xbf"
    else:
        b = bytearray(bytes(b).replace(b"\n", b"\r\n"))
    return bytes(b)


def parses(raw: bytes, suffix: str) -> bool:
    """The format-level oracle: is this JSON (.json) / JSON Lines (.jsonl) at all?

    Lenient on purpose, like the data layer's documented reading: bytes that are not UTF-8 are
    kept (``surrogateescape``; the record parser rejects a field that holds one) and a leading
    BOM is ignored. What does not parse even so is garbage that must never load.
    """
    try:
        text = raw.decode("utf-8", "surrogateescape").removeprefix("\ufeff")
        if suffix == ".json":
            json.loads(text)
        else:
            for line in text.splitlines():
                if line.strip():
                    json.loads(line)
        return True
    except (ValueError, RecursionError):
        return False


def make_data_case(r: random.Random, d: Path, i: int) -> tuple[Path, bool]:
    """(file, must_fail)."""
    recs = valid_records(r, r.randint(1, 12))
    suffix = r.choice([".jsonl", ".jsonl", ".json"])
    special = r.random()
    if special < 0.04:
        raw, suffix = b"[" * 100_000 + b"]" * 100_000, ".json"  # nesting deeper than any parser's stack
    elif special < 0.07:
        raw = b""
    elif special < 0.10:
        raw, suffix = b"a,b\n1,2\n", r.choice([".csv", ".txt", ".parquet", ""])
    else:
        if r.random() < 0.5:
            mutate_records(r, recs)
        if suffix == ".json":
            text = json.dumps(recs if r.random() < 0.9 else {"data": recs}, allow_nan=True)
        else:
            text = "".join(json.dumps(x, allow_nan=True) + "\n" for x in recs)
        raw = text.encode("utf-8", "surrogatepass")
        if r.random() < 0.5:
            raw = mutate_bytes(r, raw)
    path = d / f"case{i}{suffix}"
    path.write_bytes(raw)
    must_fail = suffix in (".json", ".jsonl") and not parses(raw, suffix)
    return path, must_fail


def test_fuzz_data_files_fail_cleanly(tmp_path):
    tok = tokenizer_for("gpt2")
    r = random.Random(20261122)
    outcomes: dict[str, int] = {}
    started = time.time()
    for i in range(N_DATA):
        path, must_fail = make_data_case(r, tmp_path, i)
        cfg = DataConfig(path=str(path), eval_split=0, max_length=64, template="alpaca")
        shim = type("Cfg", (), {"data": cfg})()
        try:
            with time_limit(10, path.name):
                data = load_data(shim, tok, 0)
        except PeftlabError as e:
            assert str(path) in str(e) or path.name in str(e), f"{path.name}: error does not name the file: {e}"
            outcomes[type(e).__name__] = outcomes.get(type(e).__name__, 0) + 1
            continue
        except Exception as e:  # noqa: BLE001 - the point of the test
            pytest.fail(f"{path.name}: {type(e).__name__} escaped: {e}\n{path.read_bytes()[:300]!r}")
        assert not must_fail, f"{path.name}: garbage loaded silently ({len(data.train)} examples)"
        assert data.train and all(ex.n_labels > 0 for ex in data.train)
        outcomes["loaded"] = outcomes.get("loaded", 0) + 1
    assert outcomes.get("loaded", 0) >= 40 and outcomes.get("DataError", 0) >= 200, outcomes
    assert time.time() - started < 60


# ---------------------------------------------------------------------------- configs

KEYS = {
    "model": ["name", "dtype", "device", "config_overrides", "seed", "quantize", "bogus"],
    "peft": ["method", "r", "alpha", "dropout", "targets", "use_rslora", "init", "bogus"],
    "data": ["path", "format", "max_length", "eval_split", "packing", "bogus"],
    "train": ["lr", "steps", "epochs", "batch_size", "grad_accum", "warmup", "schedule", "min_lr_ratio",
              "weight_decay", "adam_betas", "max_grad_norm", "eval_every", "save_every", "save_total_limit",
              "output_dir", "seed", "mixed_precision", "threads", "max_bad_steps", "distributed", "bogus"],
}
CONFIG_VALUES = [None, 0, 1, -1, 2, 3.5, -0.5, 1e308, -1e308, "inf", "-inf", "nan", ".nan", True, False, "",
                 "   ", "a\x00b", "runs/x", "/", "../../etc", [], [0.9], [0.9, 0.999], [0.9, "x"], [1, 2, 3],
                 {}, {"a": 1}, "lora", "full", "ddp", "fsdp", "cosine", "bf16", "no", "yes", 10**30, "1e-3",
                 "🙂", "x" * 5000, [[[]]], {"layers": "two"}]


def random_raw(r: random.Random) -> dict:
    raw: dict = {}
    for section in r.sample(list(KEYS) + ["extra"], r.randint(0, 4)):
        if section == "extra" or r.random() < 0.05:
            raw[section] = r.choice(CONFIG_VALUES)
            continue
        raw[section] = {k: r.choice(CONFIG_VALUES) for k in r.sample(KEYS[section], r.randint(0, 3))}
        if section == "peft" and r.random() < 0.5:
            raw[section]["method"] = r.choice(["lora", "full"])
    return raw


def assert_sane(cfg) -> None:
    """What a loaded config promises the loop (independent of how TrainConfig checks it)."""
    t: TrainConfig = cfg.train
    assert math.isfinite(t.lr) and t.lr >= 0
    assert t.batch_size >= 1 and t.grad_accum >= 1 and t.max_bad_steps >= 1
    assert t.steps is None or t.steps >= 1
    assert math.isfinite(t.epochs) and t.epochs > 0 and math.isfinite(t.warmup) and t.warmup >= 0
    assert 0 <= t.min_lr_ratio <= 1 and math.isfinite(t.weight_decay) and t.weight_decay >= 0
    assert len(t.adam_betas) == 2 and all(0 <= b < 1 for b in t.adam_betas)
    assert t.max_grad_norm is None or (math.isfinite(t.max_grad_norm) and t.max_grad_norm >= 0)
    assert t.distributed in ("ddp", "fsdp", "fsdp_grad_op") and t.schedule in ("cosine", "linear", "constant")
    assert isinstance(t.output_dir, str) and t.output_dir.strip() and "\x00" not in t.output_dir
    d = cfg.data
    assert d.max_length >= 1 and math.isfinite(d.eval_split) and d.eval_split >= 0
    assert "\x00" not in cfg.model.name and (d.path is None or "\x00" not in d.path)


def load_one(load) -> str:
    try:
        with time_limit(10, "config"):
            cfg = load()
            check_inputs(cfg)
    except PeftlabError as e:
        return type(e).__name__
    except Exception as e:  # noqa: BLE001
        pytest.fail(f"{type(e).__name__} escaped: {e}")
    assert_sane(cfg)
    return "loaded"


def test_fuzz_configs_fail_cleanly(tmp_path):
    r = random.Random(7)
    outcomes: dict[str, int] = {}
    for i in range(N_CONFIG):
        raw = random_raw(r)
        path = tmp_path / f"c{i}.yaml"
        mode = r.random()
        if mode < 0.5:  # a YAML file
            text = yaml.safe_dump(raw, allow_unicode=True)
            data = text.encode("utf-8")
            if r.random() < 0.4:
                data = mutate_bytes(r, data or b"{}\n")
            path.write_bytes(data)
            outcome = load_one(lambda p=path: load_config(p))
        else:  # command-line overrides, including ones that are not key=value at all
            ovs = [f"{s}.{k}={v}" for s, sec in raw.items() if isinstance(sec, dict) for k, v in sec.items()]
            ovs += r.sample(["noequals", "=1", "train=1", ".=x", "train..lr=1", "a.b.c.d=1", "train.lr=="], r.randint(0, 1))
            outcome = load_one(lambda o=ovs: load_config(None, o))
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    assert outcomes.get("loaded", 0) >= 30 and outcomes.get("ConfigError", 0) >= 200, outcomes


# ---------------------------------------------------------------------------- pinned findings


@pytest.mark.parametrize("text", [
    b"peft: [1, 2]\n",                 # a section that is a list
    b"train:\n  lr: .nan\n",           # NaN learning rate
    b"train: {adam_betas: [0.9, 1.0]}\n",
    b"\xff\xfe\x00t\x00r\x00a\x00i\x00n\x00",  # UTF-16
    b"data: {max_length: -5}\n",
    b"data: {eval_split: .inf}\n",
])
def test_pinned_configs(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_bytes(text)
    with pytest.raises(PeftlabError):
        check_inputs(load_config(path))


def test_trailing_data_after_a_json_array_is_an_error(tmp_path):
    tok = tokenizer_for("gpt2")
    rec = {"instruction": "Add 1 and 2.", "output": "3"}
    path = tmp_path / "two.json"
    path.write_text(json.dumps([rec] * 4) + "\n" + json.dumps([rec] * 4) + "\n")
    shim = type("Cfg", (), {"data": DataConfig(path=str(path), eval_split=0, max_length=64, template="alpaca")})()
    with pytest.raises(PeftlabError, match=r"two.json line 2 column 1: .*extra data after the array"):
        load_data(shim, tok, 0)


def test_yaml_no_is_a_word_for_string_keys(tmp_path):
    assert load_config(None, ["train.mixed_precision=no"]).train.mixed_precision == "no"
    (tmp_path / "c.yaml").write_text("train:\n  mixed_precision: no\n")
    check_inputs(load_config(tmp_path / "c.yaml"))  # YAML 1.1 reads `no` as false; it still means no
