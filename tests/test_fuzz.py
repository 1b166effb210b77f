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
from peftlab.config import SCHEDULES, DataConfig, TrainConfig
from peftlab.configure import load_config
from peftlab.data.dataset import build_datasets
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
    print(f"\ndata files: {N_DATA} inputs: {outcomes}")
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
    assert math.isfinite(t.lr) and t.lr > 0
    assert t.batch_size >= 1 and t.grad_accum >= 1 and t.max_bad_steps >= 1
    assert t.steps is None or t.steps >= 1
    assert math.isfinite(t.epochs) and t.epochs > 0 and math.isfinite(t.warmup) and t.warmup >= 0
    assert 0 <= t.min_lr_ratio <= 1 and math.isfinite(t.weight_decay) and t.weight_decay >= 0
    assert len(t.adam_betas) == 2 and all(0 <= b < 1 for b in t.adam_betas)
    assert t.max_grad_norm is None or (math.isfinite(t.max_grad_norm) and t.max_grad_norm >= 0)
    assert t.distributed in ("ddp", "fsdp", "fsdp_grad_op") and t.schedule in SCHEDULES
    assert isinstance(t.output_dir, str) and t.output_dir.strip() and "\x00" not in t.output_dir
    d = cfg.data
    assert d.max_length >= 1 and math.isfinite(d.eval_split) and d.eval_split >= 0
    assert d.eval_split < 1 or float(d.eval_split).is_integer()  # a fraction or a count, not 1.5
    alpha = getattr(cfg.peft, "alpha", None)
    assert alpha is None or (math.isfinite(alpha) and alpha > 0)
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
    print(f"\nconfigs: {N_CONFIG} inputs: {outcomes}")
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


# ---------------------------------------------------------------------------- issue 15: what an outside probe broke
#
# Four classes, each input ending in one of: a clean named error (a PeftlabError naming the key or
# the file), a correct read, a traceback (another exception type), or a silent acceptance of an
# input that is almost surely a mistake. The last two must never happen; the tally is printed.

Tally = dict[str, list]


def tally_report(name: str, tally: Tally) -> None:
    counts = {k: len(v) for k, v in tally.items()}
    print(f"\n{name}: {sum(counts.values())} inputs: {counts}")
    assert not tally["traceback"], tally["traceback"][:5]
    assert not tally["silent"], tally["silent"][:5]


def new_tally() -> Tally:
    return {"named_error": [], "read": [], "traceback": [], "silent": []}


def classify(tally: Tally, what: str, fn, names: tuple[str, ...]):
    """Run ``fn``; a PeftlabError must mention one of ``names``. Returns fn's result or None."""
    try:
        with time_limit(10, what):
            return fn()
    except PeftlabError as e:
        named = any(n in str(e) for n in names)
        tally["named_error" if named else "traceback"].append(f"{what}: {e}"[:300])
    except Exception as e:  # noqa: BLE001 - the point of the test
        tally["traceback"].append(f"{what}: {type(e).__name__}: {e}"[:300])
    return None


OVERRIDE_KEYS = {  # arch -> keys (short, HF and attribute-map names) and misspellings
    "llama": ["layers", "hidden", "heads", "kv_heads", "intermediate", "vocab", "hidden_size", "num_attention_heads",
              "num_key_value_heads", "head_dim", "max_position_embeddings", "rope_theta", "rms_norm_eps",
              "initializer_range", "attention_dropout", "hidden_act", "tie_word_embeddings", "attention_bias",
              "hiden", "layer", "num_heads", "kv_head", "n_embd", "vocab_sz", "rope_thetha", "bogus"],
    "gpt2": ["layers", "hidden", "heads", "intermediate", "vocab", "n_embd", "n_head", "n_layer", "n_inner",
             "n_positions", "resid_pdrop", "layer_norm_epsilon", "activation_function", "initializer_range",
             "hidden_size", "kv_heads", "n_embed", "n_heads", "layers_", "bogus"],
}
OVERRIDE_VALUES = [0, -1, 1, 2, 3, 4, 8, 16, 64, 2.5, 0.5, 1e-6, -0.5, float("nan"), float("inf"), float("-inf"),
                   10**30, 1e30, 2**31, "abc", "", "64", "1e3", None, True, False, [], [1, 2], {}, {"a": 1},
                   "gelu", "silu", "relu2x"]


def override_case(r: random.Random) -> tuple[str, dict]:
    arch = r.choice(list(OVERRIDE_KEYS))
    base = {"layers": 1, "hidden": 32, "heads": 4, "intermediate": 64, "vocab": 128}
    if arch == "llama":
        base["kv_heads"] = 2
    for _ in range(r.randint(1, 3)):
        base[r.choice(OVERRIDE_KEYS[arch])] = r.choice(OVERRIDE_VALUES)
    return arch, base


def override_silent(model_config, arch: str, overrides: dict) -> str | None:
    """A loaded config must hold every override it was given (else it was silently dropped) and
    shapes that make sense; returns what is wrong, or None."""
    from peftlab.model.load import SHORT_KEYS

    amap = getattr(type(model_config), "attribute_map", {}) or {}
    for key, value in overrides.items():
        hf = amap.get(SHORT_KEYS.get(key, key), SHORT_KEYS.get(key, key))
        if key.startswith("rope_") or not hasattr(model_config, hf):
            return None if key.startswith("rope_") else f"{key} accepted but not in the config"
        got = getattr(model_config, hf)
        if isinstance(value, float) and not math.isfinite(value):
            return f"{key}={value} accepted"
        if isinstance(got, (int, float)) and not isinstance(got, bool) and got != value and str(got) != str(value):
            try:
                if float(got) != float(value):
                    return f"{key}={value!r} became {got!r}"
            except (TypeError, ValueError):
                return f"{key}={value!r} became {got!r}"
    for attr in ("vocab_size", "hidden_size", "num_attention_heads", "num_hidden_layers"):
        if getattr(model_config, attr, 1) < 1:
            return f"{attr}={getattr(model_config, attr)}"
    return None


def test_fuzz_model_config_overrides():
    """Misspelt, ill-typed and out-of-range ``model.config_overrides`` (0, negative, nan, inf, huge)."""
    from peftlab.config import ModelConfig
    from peftlab.model.load import load_model

    r, tally = random.Random(15), new_tally()
    for i in range(300):
        arch, ov = override_case(r)
        cfg = ModelConfig(name=f"config:{arch}", config_overrides=ov, device="cpu")
        names = ("model.config_overrides",)
        out = classify(tally, f"case {i} {arch} {ov}", lambda c=cfg: load_model(c, with_tokenizer=False,
                                                                                   device="meta"), names)
        if out is not None:
            wrong = override_silent(out[0].config, arch, ov)
            tally["silent" if wrong else "read"].append(f"case {i} {arch} {ov}: {wrong}")
    tally_report("model.config_overrides", tally)
    assert len(tally["named_error"]) >= 150 and len(tally["read"]) >= 10


def bom_case(r: random.Random, d: Path, i: int) -> tuple[Path, Path]:
    """(plain file, the same bytes behind a UTF-8 BOM), of every text type peftlab reads."""
    recs = [{"instruction": f"Add {a} and {b}.", "input": "", "output": str(a + b)}
            for a, b in ((r.randint(0, 99), r.randint(0, 99)) for _ in range(r.randint(2, 8)))]
    suffix = r.choice([".json", ".jsonl", ".csv", ".txt"])
    if suffix == ".json":
        text = json.dumps(recs if r.random() < 0.8 else {"data": recs}, indent=r.choice([None, 1]))
    elif suffix == ".jsonl":
        text = "".join(json.dumps(x) + "\n" for x in recs)
    elif suffix == ".csv":
        text = "instruction,input,output\n" + "".join(f'"{x["instruction"]}",,{x["output"]}\n' for x in recs)
    else:
        text = "".join(f"{x['instruction']} {x['output']}\n" for x in recs)
    if r.random() < 0.3:
        text = text.replace("\n", "\r\n")
    plain, bom = d / f"p{i}{suffix}", d / f"b{i}{suffix}"
    plain.write_text(text, newline="")
    bom.write_bytes(b"\xef\xbb\xbf" + plain.read_bytes())
    return plain, bom


def test_fuzz_bom_files_read_like_the_plain_file(tmp_path):
    tok = tokenizer_for("gpt2")
    r, tally = random.Random(1515), new_tally()
    for i in range(80):
        plain, bom = bom_case(r, tmp_path, i)
        cfgs = [DataConfig(path=str(p), eval_split=0, max_length=64, template="alpaca", block_size=8)
                for p in (plain, bom)]
        want = build_datasets(cfgs[0], tok, 0)
        got = classify(tally, bom.name, lambda c=cfgs[1]: build_datasets(c, tok, 0), (bom.name,))
        if got is not None:
            same = [e.input_ids for e in got.train] == [e.input_ids for e in want.train]
            tally["read" if same else "silent"].append(bom.name)
    tally_report("UTF-8 BOM files", tally)
    assert len(tally["read"]) == 80


def nested_text(depth: int) -> str:
    """JSON text of objects and lists alternately nested ``depth`` deep around "x"."""
    opens = ['{"k": ' if k % 2 == 0 else "[" for k in range(depth)]
    return "".join(opens) + '"x"' + "".join("}" if o.startswith("{") else "]" for o in reversed(opens))


def test_fuzz_deeply_nested_json_data(tmp_path):
    """Nesting in a record, in an unused field, as the record and as the file, at depths up to 100,000."""
    tok = tokenizer_for("gpt2")
    r, tally = random.Random(99), new_tally()
    good = json.dumps({"instruction": "Add 1 and 2.", "input": "", "output": "3"})
    for i in range(60):
        depth = r.choice([2, 10, 100, 500, 990, 2000, 20_000, 100_000])
        place = r.choice(["output", "junk", "record", "file"])
        rec = nested_text(depth) if place == "record" else good[:-1] + f', "{place}": {nested_text(depth)}}}'
        suffix = r.choice([".json", ".jsonl"])
        path = tmp_path / f"n{i}{suffix}"
        if place == "file":
            text = "[" * depth + "]" * depth
        elif suffix == ".json":
            text = f"[{good}, {rec}, {good}]"
        else:
            text = f"{good}\n{rec}\n{good}\n"
        path.write_text(text)
        cfg = DataConfig(path=str(path), eval_split=0, max_length=64, template="alpaca", dedup=False)
        got = classify(tally, f"{path.name} depth {depth} in {place}", lambda c=cfg: build_datasets(c, tok, 0),
                       (path.name,))
        if got is not None:  # only nesting in a field no format reads may load, with the good records
            tally["read" if place == "junk" and len(got.train) == 3 else "silent"].append(f"{path.name} {place}")
    tally_report("deeply nested JSON", tally)


NUMBERS = ["0", "-1", "-0.0", "1e308", "1e999", "-1e999", "NaN", "Infinity", "-Infinity", "1" + "0" * 400,
           "3.5", "1e-320", "2"]


def numeric_case(r: random.Random, d: Path, i: int) -> tuple[Path, bool]:
    """(file, must_fail): a number where text or a loss weight goes. A number as text is an error; a
    weight must be >= 0 and fit a float32 loss (nan, inf, 1e308 poison it, a negative one flips it)."""
    num = r.choice(NUMBERS)
    kind = r.choice(["text", "weight", "csv"])
    if kind == "csv":
        path = d / f"x{i}.csv"  # CSV cells are text: a number there is the text of that number
        path.write_text(f"instruction,input,output\nAdd,,{num}\nAdd again,,{num}\n")
        return path, False
    if kind == "text":
        field = r.choice(["instruction", "output", "input"])
        rec = {"instruction": '"Add 1 and 2."', "input": '""', "output": '"3"', field: num}
        body = "{" + ", ".join(f'"{k}": {v}' for k, v in rec.items()) + "}"
        must_fail = True
    else:
        body = ('{"messages": [{"role": "user", "content": "1+2?"}, '
                f'{{"role": "assistant", "content": "3", "weight": {num}}}]}}')
        must_fail = num not in ("0", "-0.0", "3.5", "1e-320", "2")  # 1e308 overflows the float32 loss
    path = d / f"x{i}.jsonl"
    path.write_text(body + "\n" + '{"instruction": "Add 2 and 2.", "output": "4"}\n')
    return path, must_fail


def test_fuzz_numeric_edge_values_in_data(tmp_path):
    tok = tokenizer_for("gpt2")
    r, tally = random.Random(7115), new_tally()
    for i in range(120):
        path, must_fail = numeric_case(r, tmp_path, i)
        cfg = DataConfig(path=str(path), eval_split=0, max_length=64, format="auto")
        got = classify(tally, path.name, lambda c=cfg: build_datasets(c, tok, 0), (path.name,))
        if got is not None:
            tally["silent" if must_fail else "read"].append(f"{path.name}: {path.read_text()[:120]!r}")
    tally_report("numeric edge values in data", tally)
