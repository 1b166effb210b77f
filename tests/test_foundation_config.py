"""Config: typed sections, dotted overrides, and errors that list what is valid."""

from __future__ import annotations

import pytest

from peftlab.configure import load_config
from peftlab.errors import ConfigError


def test_defaults_and_overrides_are_typed():
    cfg = load_config(None, ["train.lr=1e-3", "peft.r=16", "peft.targets=q_proj,v_proj", "train.steps=7",
                             "data.eval_split=0", "train.max_grad_norm=none"])
    assert cfg.train.lr == pytest.approx(1e-3) and isinstance(cfg.train.lr, float)
    assert cfg.peft.method == "lora" and cfg.peft.r == 16
    assert cfg.peft.targets == "q_proj,v_proj"
    assert cfg.train.steps == 7
    assert cfg.train.max_grad_norm is None


def test_yaml_file_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("peft:\n  method: lora\n  r: 4\n  targets: [c_attn]\ntrain:\n  lr: 0.01\n")
    cfg = load_config(path, ["peft.r=2"])
    assert cfg.peft.r == 2 and cfg.peft.targets == ["c_attn"] and cfg.train.lr == 0.01


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["train.learning_rate=1"])
    assert "train.learning_rate" in str(e.value) and "lr" in str(e.value) and "batch_size" in str(e.value)


def test_method_options_belong_to_the_method():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["peft.method=full", "peft.r=8"])
    assert "peft.r" in str(e.value)


def test_unknown_method_and_bad_values():
    with pytest.raises(ConfigError, match="unknown peft.method 'loar'.*lora"):
        load_config(None, ["peft.method=loar"])
    with pytest.raises(ConfigError, match="train.lr.*number.*'fast'"):
        load_config(None, ["train.lr=fast"])
    with pytest.raises(ConfigError, match="peft.r must be >= 1"):
        load_config(None, ["peft.r=0"])
    with pytest.raises(ConfigError, match="section"):
        load_config(None, ["lr=1"])
    with pytest.raises(ConfigError, match="unknown config section 'optim'"):
        load_config(None, ["optim.lr=1"])


def test_bad_yaml_names_file_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  lr: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*line"):
        load_config(path)


def test_shipped_recipes_load_and_mean_what_they_say():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "configs"
    lora = load_config(root / "lora.yaml")
    assert (lora.peft.method, lora.peft.r, lora.peft.targets, lora.data.packing) == ("lora", 8, "all-linear", True)
    qlora = load_config(root / "qlora.yaml", ["train.steps=5"])
    assert (qlora.model.quantize, qlora.peft.r, qlora.train.steps) == ("nf4", 16, 5)


# ---------------------------------------------------------------------------- likely mistakes (issue 15)


@pytest.mark.parametrize("override, key", [
    ("train.lr=0", "train.lr"), ("train.lr=-0.001", "train.lr"),
    ("peft.alpha=-1", "peft.alpha"), ("peft.alpha=0", "peft.alpha"), ("peft.alpha=nan", "peft.alpha"),
    ("data.eval_split=1.5", "data.eval_split"), ("data.eval_split=-0.1", "data.eval_split"),
    ("data.eval_split=2.25", "data.eval_split"),
])
def test_almost_surely_a_mistake_is_refused_naming_key_and_value(override, key):
    """lr 0 trains nothing; alpha <= 0 scales the update to zero or flips it; eval_split 1.5 is
    neither a fraction nor a count (it used to hold out one record)."""
    value = override.split("=", 1)[1]
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    msg = str(e.value)
    assert key in msg and value.lstrip("-").rstrip("0").rstrip(".") in msg, msg


@pytest.mark.parametrize("method", ["lora", "dora", "delta_lora", "relora", "adalora", "moe_lora"])
def test_alpha_must_be_positive_for_every_lora_family_method(method):
    with pytest.raises(ConfigError, match=r"peft.alpha must be > 0.*-2"):
        load_config(None, [f"peft.method={method}", "peft.alpha=-2"])
    assert load_config(None, [f"peft.method={method}", "peft.alpha=0.5"]).peft.alpha == 0.5


def test_valid_eval_splits_keep_working():
    """A fraction in [0, 1) or a whole count; 1 and 1.0 are a count of one (as before)."""
    for value, expected in (("0", 0.0), ("0.05", 0.05), ("0.999", 0.999), ("1", 1.0), ("1.0", 1.0), ("96", 96.0)):
        assert load_config(None, [f"data.eval_split={value}"]).data.eval_split == expected
    assert load_config(None, ["train.lr=1e-6"]).train.lr == 1e-6


# ---------------------------------------------------------------------------- the per-method lr default


def test_unset_lr_is_the_methods_own_default_and_a_given_one_wins():
    from peftlab.config import DEFAULT_LR

    lr = {m: load_config(None, [f"peft.method={m}"]).train.lr for m in ("lora", "dora", "relora", "full", "boft")}
    assert lr["lora"] == lr["dora"] == lr["relora"] == 5e-4  # the LoRA family inherits LoRAConfig's
    assert lr["full"] == 5e-5
    assert lr["boft"] == DEFAULT_LR == 2e-4  # a method that names no default of its own
    assert load_config(None, ["peft.method=full", "train.lr=1e-3"]).train.lr == 1e-3
    assert load_config(None, ["train.lr=none"]).train.lr == 5e-4  # none spelled out: the default too
    # GRPO takes a fifth of the method's lr (1e-4 beat 5e-4 for LoRA on builtin:tasks)
    assert load_config(None, ["train.objective=grpo"]).train.lr == pytest.approx(1e-4)
    assert load_config(None, ["train.objective=grpo", "train.lr=5e-4"]).train.lr == 5e-4


def test_the_python_api_resolves_the_default_too_and_the_saved_config_names_it(tmp_path):
    from peftlab.config import Config, TrainConfig
    from peftlab.methods.full import FullConfig
    from peftlab.methods.lora import LoRAConfig

    assert Config(peft=LoRAConfig(), train=TrainConfig()).train.lr == 5e-4
    assert Config(peft=FullConfig(), train=TrainConfig(lr=1e-5)).train.lr == 1e-5
    path = tmp_path / "config.yaml"
    load_config(None, ["peft.method=full"]).save(path)
    assert "lr: 5.0e-05" in path.read_text()  # a run's saved config carries the number it trained with
    assert load_config(path).train.lr == 5e-5


def test_a_config_without_a_method_is_refused_by_name_and_one_given_later_gets_its_lr(tmp_path):
    from peftlab.config import Config, TrainConfig
    from peftlab.methods.full import FullConfig
    from peftlab.train.setup import check_inputs

    bare = Config(train=TrainConfig(output_dir=str(tmp_path / "run")))
    assert bare.train.lr is None
    with pytest.raises(ConfigError, match=r"Config\.peft is None.*LoRAConfig"):
        check_inputs(bare)
    bare.peft = FullConfig()  # the method set after construction: its default lr, before anything loads
    check_inputs(bare)
    assert bare.train.lr == 5e-5


def test_every_methods_default_lr_is_a_positive_number():
    import math

    from peftlab import registry
    from peftlab.config import default_lr

    for name in registry.names():
        lr = default_lr(registry.get(name).config_cls)
        assert isinstance(lr, float) and math.isfinite(lr) and 0 < lr < 1, name
