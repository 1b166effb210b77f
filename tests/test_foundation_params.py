"""Exact parameter counts: GPT-2 small and the SmolLM2 shape, against closed forms and PEFT."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import peftlab
from peftlab import registry
from peftlab.configure import load_config
from peftlab.model.load import load_model
from peftlab.model.params import param_report

SRC = str(Path(peftlab.__file__).resolve().parents[1])
GPT2_TARGETS = "peft.targets=c_attn,c_proj,c_fc"
# SmolLM2-135M's shape as config:llama overrides (no weights needed to count)
SMOL = ["model.name=config:llama", "model.config_overrides.layers=30", "model.config_overrides.hidden=576",
        "model.config_overrides.heads=9", "model.config_overrides.kv_heads=3",
        "model.config_overrides.intermediate=1536", "model.config_overrides.vocab=49152",
        "model.config_overrides.tie_word_embeddings=true"]


def count(overrides: list[str]) -> dict:
    cfg = load_config(None, overrides)
    model, _ = load_model(cfg.model, with_tokenizer=False, device="meta")
    registry.get(cfg.peft.method).apply(model, cfg.peft)
    return param_report(model).to_json()


def test_gpt2_small_total():
    assert count(["model.name=config:gpt2", "peft.method=full"]) == {"trainable": 124_439_808,
                                                                     "total": 124_439_808}


def test_gpt2_lora_rank_table():
    """The seeds' table: LoRA on c_attn, attn.c_proj, c_fc, mlp.c_proj = 147,456 per unit of rank.

    Per block: c_attn (768 -> 2304), attn.c_proj (768 -> 768), c_fc (768 -> 3072),
    mlp.c_proj (3072 -> 768): r * (3072 + 1536 + 3840 + 3840) = 12,288 r; 12 blocks.
    """
    per_rank = 12 * ((768 + 2304) + (768 + 768) + (768 + 3072) + (3072 + 768))
    assert per_rank == 147_456
    for r in (1, 2, 4, 8, 16, 32):
        got = count(["model.name=config:gpt2", f"peft.r={r}", GPT2_TARGETS])
        assert got["trainable"] == per_rank * r
        assert got["total"] == 124_439_808 + per_rank * r


def test_smollm2_shape_counts():
    assert count([*SMOL, "peft.method=full"])["total"] == 134_515_008
    # all-linear: q,k,v,o,gate,up,down per layer; q/o 576x576, k/v 576x192, gate/up 576x1536, down 1536x576
    per_rank = 30 * ((576 + 576) * 2 + (576 + 192) * 2 + (576 + 1536) * 3)
    assert per_rank == 305_280
    assert count([*SMOL, "peft.r=8"])["trainable"] == 8 * per_rank == 2_442_240
    assert count([*SMOL, "peft.r=1", "peft.targets=q_proj,v_proj"])["trainable"] == 57_600


def test_counts_match_peft():
    from peft import LoraConfig, get_peft_model

    cfg = load_config(None, ["model.name=config:gpt2", "model.config_overrides.n_layer=2"])
    model, _ = load_model(cfg.model, with_tokenizer=False, device="meta")
    peft_model = get_peft_model(model, LoraConfig(r=8, target_modules=["c_attn", "c_proj", "c_fc"],
                                                  fan_in_fan_out=True))
    trainable, total = peft_model.get_nb_trainable_parameters()
    ours = count(["model.name=config:gpt2", "model.config_overrides.n_layer=2", "peft.r=8", GPT2_TARGETS])
    assert ours == {"trainable": trainable, "total": total}


@pytest.mark.parametrize("r", [1, 32])
def test_cli_json(r):
    out = subprocess.run(
        [sys.executable, "-m", "peftlab", "params", "model.name=config:gpt2", "peft.method=lora", f"peft.r={r}",
         GPT2_TARGETS, "--json"],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": SRC}, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"trainable": 147_456 * r, "total": 124_439_808 + 147_456 * r}


def test_cli_bad_input_is_a_clear_error():
    out = subprocess.run(
        [sys.executable, "-m", "peftlab", "params", "model.name=config:gpt2", "peft.targets=attn_q"],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": SRC}, timeout=120,
    )
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert "'attn_q' matches no layer" in out.stderr and "c_attn" in out.stderr


# ---------------------------------------------------------------------------- config_overrides (issue 15)

TINY_LLAMA = ["model.name=config:llama", "model.config_overrides.layers=2", "model.config_overrides.hidden=64",
              "model.config_overrides.heads=4", "model.config_overrides.intermediate=128",
              "model.config_overrides.vocab=1024"]


def test_misspelt_override_is_an_error_with_did_you_mean():
    """`hiden=64` used to be kept as an unused attribute: a 366M-parameter default model instead of 4M."""
    cfg = load_config(None, [*TINY_LLAMA, "model.config_overrides.hiden=96"])
    with pytest.raises(peftlab.errors.ConfigError) as e:
        load_model(cfg.model, with_tokenizer=False, device="meta")
    msg = str(e.value)
    assert "model.config_overrides.hiden" in msg and "did you mean 'hidden'" in msg, msg
    assert "hidden_size" in msg and "num_key_value_heads" in msg and "kv_heads" in msg, msg  # the valid names


@pytest.mark.parametrize("override, expect", [
    ("hidden=abc", r"model.config_overrides.hidden.*integer.*'abc'"),
    ("heads=5", r"model.config_overrides.*hidden size \(64\) is not a multiple of the number of attention heads \(5\)"),
    ("rope_theta=abc", r"model.config_overrides.rope_theta.*number.*'abc'"),
    ("kv_heads=3", r"model.config_overrides.kv_heads=3.*heads=4.*multiple"),
    ("vocab=0", r"model.config_overrides.vocab must be >= 1, got 0"),
    ("layers=-1", r"model.config_overrides.layers must be >= 1, got -1"),
    ("initializer_range=nan", r"model.config_overrides.initializer_range must be a finite number"),
    ("rms_norm_eps=-inf", r"model.config_overrides.rms_norm_eps must be a finite number"),
    ("hidden=1e30", r"model.config_overrides.hidden.*too large"),
    ("tie_word_embeddings=maybe", r"model.config_overrides.tie_word_embeddings.*true or false"),
    ("num_attention_heads=8", r"model.config_overrides sets num_attention_heads twice \(heads=4, num_attention_heads=8\)"),
    ("hidden_act=gelu_typo", r"model.config_overrides.hidden_act 'gelu_typo' is not an activation.*silu"),
])
def test_bad_override_values_are_clean_named_errors(override, expect):
    """Refused before the model is built, so `peftlab params` and `peftlab train` both stop."""
    cfg = load_config(None, [*TINY_LLAMA, f"model.config_overrides.{override}"])
    with pytest.raises(peftlab.errors.ConfigError, match=expect):
        load_model(cfg.model, with_tokenizer=False, device="meta")


def test_params_cli_refuses_a_bad_override_without_a_traceback(capsys):
    from peftlab import cli

    assert cli.main(["params", *TINY_LLAMA, "model.config_overrides.kv_heads=3"]) == 2
    err = capsys.readouterr().err
    assert "kv_heads=3" in err and "Traceback" not in err


def test_valid_overrides_of_every_spelling_still_apply():
    no_heads = [o for o in TINY_LLAMA if ".heads=" not in o]
    cfg = load_config(None, [*no_heads, "model.config_overrides.kv_heads=2", "model.config_overrides.rope_theta=5e4",
                             "model.config_overrides.num_attention_heads=8", "model.config_overrides.attention_dropout=0"])
    model, _ = load_model(cfg.model, with_tokenizer=False, device="meta")
    c = model.config
    assert (c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.vocab_size) == (64, 8, 2, 1024)
    assert c.rope_parameters["rope_theta"] == 5e4
    gpt2 = load_config(None, ["model.name=config:gpt2", "model.config_overrides.n_embd=64",
                              "model.config_overrides.heads=2", "model.config_overrides.layers=1"])
    model, _ = load_model(gpt2.model, with_tokenizer=False, device="meta")
    assert (model.config.n_embd, model.config.n_head, model.config.n_layer) == (64, 2, 1)
