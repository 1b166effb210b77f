"""Sweep planning (grid x variants, method-specific keys) and failures that do not stop a sweep."""

from __future__ import annotations

import json

import pytest
import yaml

from conftest import TINY
from peftlab.errors import ConfigError
from peftlab.lab.sweep import is_done, plan, run_spec, run_sweep


def tiny_sweep(path, data, **spec):
    base = {
        "name": "t",
        "config": {
            "model": {"name": "config:gpt2", "config_overrides": dict(TINY["gpt2"])},
            "data": {"path": str(data), "eval_split": 6, "max_length": 48},
            "train": {"steps": 3, "batch_size": 4, "lr": 1e-2, "eval_every": 2, "threads": 1,
                      "mixed_precision": "fp32"},
        },
        "eval": {"limit": 3, "max_new_tokens": 3, "batch_size": 4, "prompts": ["Hi", "What is 2 + 2?"],
                 "sample_max_new_tokens": 3},
    }
    base.update(spec)
    path.write_text(yaml.safe_dump(base))
    return path


def write_data(path, n=30):
    path.write_text(json.dumps([{"instruction": f"What is {i} + {i}?", "output": str(2 * i)} for i in range(n)]))
    return path


def test_grid_drops_keys_a_method_does_not_have(tmp_path):
    f = tiny_sweep(tmp_path / "s.yaml", "d.json", grid={"peft.method": ["full", "lora"], "peft.r": [1, 2]})
    sweep = plan(f, tmp_path / "out")
    assert [p.name for p in sweep.points] == ["full", "lora-r1", "lora-r2"]
    full = sweep.points[0]
    assert full.dropped == ["peft.r"] and full.overrides == {"peft.method": "full"}
    assert "r" not in full.config["peft"]
    assert sweep.points[2].config["peft"] == {"method": "lora", "r": 2}
    assert sweep.run_dir(sweep.points[1]) == tmp_path / "out" / "runs" / "lora-r1"


def test_variants_cross_the_grid_and_a_lora_base_works_for_full(tmp_path):
    f = tiny_sweep(tmp_path / "s.yaml", "d.json",
                   variants=[{"name": "full", "peft.method": "full", "train.lr": 1e-4},
                             {"peft.method": "lora", "peft.use_rslora": True}],
                   grid={"peft.r": [4, 8], "train.seed": [1, 2]})
    raw = yaml.safe_load(f.read_text())
    raw["config"]["peft"] = {"method": "lora", "alpha": 32}  # base peft keys full does not have
    f.write_text(yaml.safe_dump(raw))
    sweep = plan(f, tmp_path / "out")
    assert [p.name for p in sweep.points] == ["full-seed1", "full-seed2", "lora-r4-seed1", "lora-r4-seed2",
                                              "lora-r8-seed1", "lora-r8-seed2"]
    assert sweep.points[0].config["peft"] == {"method": "full"}
    assert sweep.points[0].config["train"]["lr"] == 1e-4
    assert sweep.points[0].dropped == ["peft.alpha", "peft.r"]
    assert sweep.points[3].config["peft"] == {"method": "lora", "alpha": 32, "use_rslora": True, "r": 4}


@pytest.mark.parametrize("spec, message", [
    ({"grid": {"peft.rank": [1, 2]}}, "peft.rank is not an option of any method"),
    ({"grid": {"peft.r": [1]}, "variants": [{"peft.r": 2}]}, "set in variants[0] and in grid"),
    ({"grid": {"peft.r": []}}, "non-empty list"),
    ({"grid": {"train.lr": ["fast"]}}, "expected a number"),
    ({"grid": {"train.nope": [1]}}, "unknown config key train.nope"),
    ({"parallel": 0}, "'parallel' must be an integer >= 1"),
    ({"eval": {"limits": 3}}, "unknown config key eval.limits"),
])
def test_bad_sweep_files_are_clear_errors(tmp_path, spec, message):
    f = tiny_sweep(tmp_path / "s.yaml", "d.json", **spec)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        plan(f)


def test_unknown_sweep_key(tmp_path):
    f = tiny_sweep(tmp_path / "s.yaml", "d.json", grids={"peft.r": [1]})
    with pytest.raises(ConfigError, match="unknown sweep key 'grids'"):
        plan(f)


def test_overrides_apply_to_the_base(tmp_path):
    f = tiny_sweep(tmp_path / "s.yaml", "d.json", grid={"peft.r": [1, 2]})
    sweep = plan(f, tmp_path / "o", ["train.steps=7", "data.path=other.json"])
    assert all(p.config["train"]["steps"] == 7 and p.config["data"]["path"] == "other.json" for p in sweep.points)


def test_a_failing_run_is_recorded_and_the_sweep_goes_on(tmp_path):
    data = write_data(tmp_path / "d.json")
    # rank 100 does not fit the tiny model's 64-wide layers: that run fails inside its worker
    f = tiny_sweep(tmp_path / "s.yaml", data, grid={"peft.r": [100, 2]}, parallel=2,
                   eval={"generate": False, "prompts": []})
    sweep = plan(f, tmp_path / "out")
    lines = []
    outcome = run_sweep(sweep, say=lines.append)
    assert outcome == {"ok": ["lora-r2"], "failed": ["lora-r100"], "skipped": []}
    bad = json.loads((tmp_path / "out/runs/lora-r100/result.json").read_text())
    assert bad["train_info"]["status"] == "failed" and bad["run_info"]["exit_code"] == 1
    assert "peft.r=100 does not fit" in bad["run_info"]["error_msg"]
    good = json.loads((tmp_path / "out/runs/lora-r2/result.json").read_text())
    assert good["train_info"]["status"] == "success"
    # GPT-2 blocks: c_attn 64->192, attn c_proj 64->64, c_fc 64->256, mlp c_proj 256->64; r x layers x sum(in+out)
    assert good["train_info"]["num_trainable_params"] == 2 * 2 * ((64 + 192) + (64 + 64) + (64 + 256) + (256 + 64))
    assert any("FAILED" in line and "lora-r100" in line for line in lines)
    # the next invocation skips the success and tries the failure again
    again = plan(f, tmp_path / "out")
    assert [is_done(again.run_dir(p), run_spec(again, p)) for p in again.points] == [False, True]
    # a changed config is not "done" any more
    changed = plan(f, tmp_path / "out", ["train.steps=4"])
    assert not is_done(changed.run_dir(changed.points[1]), run_spec(changed, changed.points[1]))
    # the report lists the failure with its reason, and tables only what ran
    pytest.importorskip("matplotlib")
    from peftlab.lab.report import write_report

    paths = write_report([tmp_path / "out"], tmp_path / "out", generate_missing=False)
    md = paths["md"].read_text()
    assert "- **lora-r100**: failed — `peft.r=100 does not fit" in md
    quality = md.split("## Quality")[1].split("##")[0]
    assert "| lora-r2 |" in quality and "| lora-r100 |" not in quality
