"""Guards: non-finite steps are skipped and counted, impossible runs stop before training,
adapters refuse the wrong base, and nothing is ever unpickled."""

from __future__ import annotations

import json
import math
import random
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_model, tiny_overrides
from peftlab import cli
from peftlab.config import ModelConfig
from peftlab.configure import load_config
from peftlab.data.dataset import build_datasets
from peftlab.data.sampler import BatchSampler
from peftlab.errors import ConfigError, PeftlabError
from peftlab.export.adapter import load_adapter, save_adapter
from peftlab.methods.lora import LoRAConfig
from peftlab.methods.lora import apply as apply_lora
from peftlab.model.load import load_model
from peftlab.train.loop import train
from peftlab.train.step import TrainingDiverged
from peftlab.validate import check_name, check_path

BAD_WORDS = "quagga xylophone zygote"


def write_data(path: Path, n: int = 64, bad_at: int | None = None, long_at: int | None = None) -> Path:
    r = random.Random(0)
    with path.open("w") as f:
        for i in range(n):
            a, b = r.randint(0, 99), r.randint(0, 99)
            out = f"{a} plus {b} is {a + b}."
            if i == bad_at:
                out = f"{out} {BAD_WORDS}"
            if i == long_at:
                out = " ".join(["word"] * 400)
            f.write(json.dumps({"instruction": f"Add {a} and {b}.", "output": out}) + "\n")
    return path


def args(data: Path, out: Path, **extra) -> list[str]:
    base = {"data.path": data, "data.eval_split": 0, "data.max_length": 96, "peft.r": 4,
            "train.steps": 20, "train.batch_size": 2, "train.grad_accum": 2, "train.lr": 1e-3,
            "train.threads": 1, "train.mixed_precision": "no", "train.progress": False, "train.output_dir": out}
    base.update(extra)
    return tiny_overrides("llama") + [f"{k}={v}" for k, v in base.items()]


# ---------------------------------------------------------------------------- non-finite steps


def test_a_nan_record_skips_exactly_its_steps_and_training_goes_on(tmp_path):
    """One record carries a token whose (untied) embedding row is NaN: every optimiser step that
    contains it has a NaN loss, is skipped and counted; all other steps train normally."""
    data = write_data(tmp_path / "d.jsonl", bad_at=17)
    cfg = load_config(None, args(data, tmp_path / "run", **{"train.max_bad_steps": 3}))
    model, tok = tiny_model("llama", tie_word_embeddings=False)
    ds = build_datasets(cfg.data, tok, cfg.train.seed)
    (bad,) = [i for i, ex in enumerate(ds.train) if ex.source.endswith("line 18")]
    others = {t for i, ex in enumerate(ds.train) if i != bad for t in ex.input_ids}
    poison = next(t for t in ds.train[bad].input_ids if t not in others)
    with torch.no_grad():
        model.get_input_embeddings().weight[poison] = float("nan")

    # the steps that must be skipped, from the same sampler the loop uses
    sampler = BatchSampler(len(ds.train), 2, cfg.train.seed, True)
    good = expected_skips = 0
    while good < cfg.train.steps:
        step_examples = [i for _ in range(2) for i in sampler.next()]
        if bad in step_examples:
            expected_skips += 1
        else:
            good += 1
    assert expected_skips >= 1

    result = train(cfg, model=model, tokenizer=tok)
    summary = json.loads((result.run_dir / "summary.json").read_text())
    assert summary["skipped_steps"] == expected_skips
    assert [r["step"] for r in result.metrics] == list(range(1, 21))
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in result.metrics)
    weights = load_file(str(result.artifact / "adapter_model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_a_diverging_run_stops_after_max_bad_steps_with_a_clear_message(tmp_path, capsys):
    """lr=1e30: step 1 is finite and throws the adapter to ~1e30; every step after is inf/NaN."""
    data = write_data(tmp_path / "d.jsonl")
    a = args(data, tmp_path / "run", **{"train.lr": 1e30, "train.max_bad_steps": 3, "train.warmup": 0,
                                        "train.max_grad_norm": "none"})
    with pytest.raises(TrainingDiverged, match="3 optimiser steps in a row had a non-finite loss or gradient"):
        train(load_config(None, a))
    assert cli.main(["train", *a, "train.overwrite=true"]) == 2
    err = capsys.readouterr().err
    assert "peftlab train: error: 3 optimiser steps in a row" in err and "lower train.lr" in err
    assert err.count("step skipped") >= 6 and "Traceback" not in err
    assert [json.loads(x)["step"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()] == [1]


# ---------------------------------------------------------------------------- impossible settings


@pytest.mark.parametrize("extra, match", [
    ({"train.batch_size": 100, "train.steps": 1}, r"train.batch_size=100 .* there are 64; lower train.batch_size"),
    ({"data.max_length": 1024}, r"reach \d+ tokens, but the model's context is 256 positions; set data.max_length=256"),
    ({"peft.targets": "no_such_layer"}, r"peft.targets"),
    ({"peft.r": 1000}, r"peft.r=1000 does not fit"),
    ({"train.lr": "nan"}, r"train.lr must be a finite number"),
    ({"train.adam_betas": "0.9,1.5"}, r"train.adam_betas\[1\] must be < 1.0"),
    ({"train.output_dir": "a\x00b"}, r"control character"),
    ({"data.path": "x\x00.jsonl"}, r"data.path .* control character"),
    ({"train.max_bad_steps": 0}, r"train.max_bad_steps must be >= 1"),
])
def test_impossible_settings_stop_before_training(tmp_path, extra, match):
    data = write_data(tmp_path / "d.jsonl", long_at=3)
    a = args(data, tmp_path / "run", **extra)
    with pytest.raises(ConfigError, match=match):
        train(load_config(None, a))
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_output_dir_that_is_a_file_is_refused(tmp_path):
    data = write_data(tmp_path / "d.jsonl")
    (tmp_path / "taken").write_text("not a directory")
    with pytest.raises(ConfigError, match="exists and is not a directory"):
        train(load_config(None, args(data, tmp_path / "taken")))


def test_an_exception_inside_a_method_becomes_an_incompatibility_error(tmp_path, monkeypatch):
    from peftlab import registry

    lora = registry.get("lora")

    def broken(model, cfg):
        raise AttributeError("'LlamaForCausalLM' object has no attribute 'transformer'")

    monkeypatch.setitem(registry._METHODS, "lora", type(lora)(**{**lora.__dict__, "apply": broken}))
    data = write_data(tmp_path / "d.jsonl")
    with pytest.raises(ConfigError, match=r"peft.method='lora' cannot be applied to this llama model"):
        train(load_config(None, args(data, tmp_path / "run")))


def test_names_and_paths_from_config_are_checked():
    assert check_name("math-v2.1", "adapter name") == "math-v2.1"
    for bad in ("", "..", "a/b", "../x", "a b", "x" * 200, "-flag", "a\x00"):
        with pytest.raises(ConfigError, match="not a valid name"):
            check_name(bad, "adapter name")
    for bad in ("", "  ", "a\nb", 3):
        with pytest.raises(ConfigError):
            check_path(bad, "train.output_dir")


# ---------------------------------------------------------------------------- adapters and the base


def lora_adapter(tmp_path: Path, seed: int = 0) -> tuple[Path, torch.nn.Module]:
    model, _ = tiny_model("llama", seed=seed)
    cfg = LoRAConfig(r=4)
    apply_lora(model, cfg)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)
    return save_adapter(model, cfg, tmp_path / "adapter", base_model_name="tiny-llama"), model


def test_an_adapter_refuses_a_base_with_other_weights(tmp_path):
    adapter, _ = lora_adapter(tmp_path, seed=0)
    record = json.loads((adapter / "peftlab.json").read_text())["base_fingerprint"]
    assert len(record["weights_sha256"]) == 64 and len(record["weights_sample"]) == 8
    other, _ = tiny_model("llama", seed=1)  # same architecture and shapes, other weights
    with pytest.raises(ConfigError, match="trained on other base weights"):
        load_adapter(other, adapter)


def test_an_adapter_loads_on_its_base_in_another_precision(tmp_path):
    adapter, trained = lora_adapter(tmp_path, seed=0)
    same, _ = tiny_model("llama", seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_adapter(same, adapter)  # exact: no warning
    ids = torch.randint(0, 1000, (1, 8), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(same(ids).logits, trained(ids).logits, atol=0, rtol=0)
    bf16, _ = tiny_model("llama", seed=0)
    bf16.to(torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_adapter(bf16, adapter)  # bf16-rounded hash: still the same base
    fp16, _ = tiny_model("llama", seed=0)
    fp16.to(torch.float16)
    with pytest.warns(UserWarning, match="differ slightly"):
        load_adapter(fp16, adapter)


def test_an_adapter_refuses_a_base_of_other_shapes(tmp_path):
    adapter, _ = lora_adapter(tmp_path)
    wider, _ = tiny_model("llama", hidden=128, heads=4)
    with pytest.raises(ConfigError, match="another base model .*hidden_size: adapter 64 vs model 128"):
        load_adapter(wider, adapter)


def test_pickle_weights_are_refused_everywhere(tmp_path):
    adapter, _ = lora_adapter(tmp_path)
    (adapter / "adapter_model.safetensors").unlink()
    (adapter / "adapter_model.bin").write_bytes(b"\x80\x04K\x01.")
    model, _ = tiny_model("llama")
    with pytest.raises(ConfigError, match="pickle file; peftlab never loads pickled weights"):
        load_adapter(model, adapter)

    model_dir = tmp_path / "model"
    model.config.save_pretrained(model_dir)
    (model_dir / "pytorch_model.bin").write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(ConfigError, match="weights only as pickle files .*pytorch_model.bin"):
        load_model(ModelConfig(name=str(model_dir)), with_tokenizer=False)
    data = write_data(tmp_path / "d.jsonl")
    a = [x for x in args(data, tmp_path / "run") if not x.startswith("model.")] + [f"model.name={model_dir}"]
    with pytest.raises(PeftlabError, match="never unpickles"):
        train(load_config(None, a))


_LIMITED_RUN = """
import resource, sys
limit = int(sys.argv[1])
if limit:
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
from peftlab.cli import main
code = main(sys.argv[2:])
print("VMPEAK_KB", [l for l in open("/proc/self/status") if l.startswith("VmPeak")][0].split()[1], flush=True)
sys.exit(code)
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux's /proc and RLIMIT_AS")
def test_out_of_memory_is_a_clear_error_with_what_to_change(tmp_path):
    """A real allocation failure (the process's address space capped a little above what a small
    step needs; a step of 16 x 2048 tokens with eager attention needs gigabytes more) ends with
    exit status 2 and a message naming the step, the batch and the settings to change."""
    import os
    import subprocess
    import sys

    data = tmp_path / "corpus.jsonl"
    with data.open("w") as f:
        for i in range(60):
            f.write(json.dumps({"text": f"doc {i} " + " ".join(f"word{j % 97}" for j in range(3000))}) + "\n")
    script = tmp_path / "limited.py"
    script.write_text(_LIMITED_RUN)
    base = ["train", "model.name=config:llama", "model.config_overrides.layers=1", "model.config_overrides.hidden=32",
            "model.attn_implementation=eager", f"data.path={data}",
            "data.objective=pretrain", "data.eval_split=0", "train.mixed_precision=no", "train.threads=1",
            "train.progress=false", "train.overwrite=true", "train.steps=1", f"train.output_dir={tmp_path / 'run'}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}

    def run(limit: int, *extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(script), str(limit), *base, *extra], capture_output=True,
                              text=True, env=env, timeout=300)

    small = ("train.batch_size=1", "data.max_length=64")
    free = run(0, *small)
    assert free.returncode == 0, free.stderr
    limit = int(free.stdout.split("VMPEAK_KB")[1].split()[0]) * 1024 + 600 * 2**20
    assert run(limit, *small).returncode == 0  # the cap leaves room for a small step
    big = run(limit, "train.batch_size=16", "data.max_length=2048")
    assert big.returncode == 2, big.stderr[-2000:]
    msg = big.stderr
    assert "Traceback" not in msg
    assert "out of memory in training step 1 on cpu (micro-batch of 16 rows x 2048 tokens" in msg
    for advice in ("lower train.batch_size (now 16)", "raise train.grad_accum (now 1)",
                   "model.gradient_checkpointing=true", "lower data.max_length (now 2048)", "model.quantize=nf4"):
        assert advice in msg, advice
