"""A DeepSpeed JSON config (as LLaMA-Factory ships them) is mapped onto peftlab's settings, with notes."""

from __future__ import annotations

import json
import subprocess

import pytest
import yaml

from conftest import tiny_overrides
from peftlab.configure import load_config
from peftlab.errors import ConfigError
from shipkit import cli, cli_env

# the shape of LLaMA-Factory's examples/deepspeed/ds_z2_config.json and ds_z3_offload_config.json
Z2 = {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
      "gradient_clipping": "auto", "zero_allow_untested_optimizer": True,
      "fp16": {"enabled": "auto", "loss_scale": 0, "initial_scale_power": 16}, "bf16": {"enabled": "auto"},
      "zero_optimization": {"stage": 2, "allgather_partitions": True, "overlap_comm": False, "reduce_scatter": True,
                            "reduce_bucket_size": 5e8, "contiguous_gradients": True}}
Z3 = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 8, "gradient_clipping": 0.5,
      "bf16": {"enabled": True}, "optimizer": {"type": "AdamW", "params": {"lr": "auto"}},
      "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}, "offload_param": {"device": "cpu"},
                            "stage3_max_live_parameters": 1e9}}


def _write(tmp_path, name, data):
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return str(path)


def test_zero2_with_autos_maps_the_stage_and_keeps_peftlabs_values(tmp_path):
    cfg = load_config(None, [f"train.deepspeed={_write(tmp_path, 'z2.json', Z2)}", "train.batch_size=3"])
    assert cfg.train.distributed == "fsdp_grad_op" and cfg.train.batch_size == 3
    assert cfg.train.mixed_precision == "auto" and cfg.train.deepspeed is None
    text = "\n".join(cfg.notes)
    assert "zero_optimization.stage=2 -> train.distributed=fsdp_grad_op" in text
    assert "ignored zero_optimization.overlap_comm" in text and "ignored zero_allow_untested_optimizer" in text


def test_zero3_offload_maps_numbers_and_says_what_it_ignored(tmp_path):
    cfg = load_config(None, [f"train.deepspeed={_write(tmp_path, 'z3.json', Z3)}"])
    t = cfg.train
    assert (t.distributed, t.mixed_precision, t.batch_size, t.grad_accum, t.max_grad_norm) == ("fsdp", "bf16", 2, 8, 0.5)
    text = "\n".join(cfg.notes)
    assert "peftlab does not offload to CPU" in text and "ignored optimizer (peftlab's AdamW" in text


def test_conflicts_and_bad_files_are_named(tmp_path):
    z3 = _write(tmp_path, "z3.json", Z3)
    with pytest.raises(ConfigError, match=r"train.distributed=fsdp but the config sets train.distributed=ddp"):
        load_config(None, [f"train.deepspeed={z3}", "train.distributed=ddp"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(None, [f"train.deepspeed={tmp_path / 'nope.json'}"])
    (tmp_path / "bad.json").write_text("{stage: 3")
    with pytest.raises(ConfigError, match="bad.json.*not a readable JSON"):
        load_config(None, [f"train.deepspeed={tmp_path / 'bad.json'}"])
    with pytest.raises(ConfigError, match="stage 4 is not 0, 1, 2 or 3"):
        load_config(None, [f"train.deepspeed={_write(tmp_path, 's4.json', {'zero_optimization': {'stage': 4}})}"])


def test_train_prints_the_mapping_and_the_run_keeps_the_mapped_keys(tmp_path):
    ds = _write(tmp_path, "z0.json", {"zero_optimization": {"stage": 0}, "gradient_accumulation_steps": 2})
    r = subprocess.run(cli("train", *tiny_overrides("llama"), "data.path=builtin:tasks", "train.steps=1",
                           "train.eval_every=0", "train.progress=false", f"train.output_dir={tmp_path / 'run'}",
                           f"train.deepspeed={ds}"), capture_output=True, text=True, env=cli_env())
    assert r.returncode == 0, r.stderr[-2000:]
    assert "train.deepspeed: gradient_accumulation_steps=2 -> train.grad_accum=2" in r.stdout
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["train"]
    assert saved["grad_accum"] == 2 and saved["deepspeed"] is None
