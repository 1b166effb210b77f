"""What LoHa, LoKr, OFT, LN tuning and trainable tokens promise beyond the contract (tests/test_contract.py
proves parity with PEFT, merge, save/load and training for each): LoKr's factorisation and OFT's
rotations equal PEFT's own functions, the exact Cayley transform is orthogonal, trainable tokens touch
only their rows, and bad settings fail with errors that name the key.
"""

from __future__ import annotations

import pytest
import torch

from conftest import batch_logits, batch_of, perturb, small_model, train_steps, with_method
from peftlab import api
from peftlab.config import build_dataclass
from peftlab.errors import ConfigError
from peftlab.export.adapter import load_adapter
from peftlab.methods import boft, lycoris, oft

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("factor", [-1, 1, 2, 3, 4, 8, 16, 100])
def test_lokr_factorization_equals_peft(factor):
    from peft.tuners.lokr.layer import factorization

    for n in range(1, 700):
        assert lycoris.factorization(n, factor) == factorization(n, factor), (n, factor)


@pytest.mark.parametrize("neumann,terms", [(True, 1), (True, 2), (True, 3), (True, 5), (True, 8), (False, 5)])
def test_oft_rotations_equal_peft(neumann, terms):
    from peft.tuners.oft.layer import OFTRotationModule

    size, blocks = 8, 3
    theirs = OFTRotationModule(blocks, size * (size - 1) // 2, size, blocks * size, use_cayley_neumann=neumann,
                               num_cayley_neumann_terms=terms)
    cfg = build_dataclass(oft.OFTConfig, {"block_size": size, "use_cayley_neumann": neumann,
                                          "num_cayley_neumann_terms": terms}, "peft")
    ours = oft.OFTRotation(blocks, size, cfg, "cpu", torch.float32)
    with torch.no_grad():
        w = torch.randn(blocks, size * (size - 1) // 2, generator=torch.Generator().manual_seed(0)) * 0.1
        theirs.weight.copy_(w)
        ours.weight.copy_(w)
    want = theirs._cayley_batch(theirs.weight, size, neumann, terms)
    torch.testing.assert_close(ours.rotations(), want, atol=1e-6, rtol=0)


def test_exact_cayley_is_orthogonal():
    cfg = build_dataclass(oft.OFTConfig, {"block_size": 16, "use_cayley_neumann": False}, "peft")
    rot = oft.OFTRotation(4, 16, cfg, "cpu", torch.float64)
    with torch.no_grad():
        rot.weight.normal_(generator=torch.Generator().manual_seed(1))  # far from the identity
    r = rot.rotations()
    torch.testing.assert_close(r.transpose(-2, -1) @ r, torch.eye(16, dtype=torch.float64).expand(4, 16, 16),
                               atol=1e-10, rtol=0)


@pytest.mark.parametrize("factors", [1, 2, 3])
def test_boft_butterfly_equals_peft_construction(factors):
    """M = M_{m-1}···M_0 with M_i = P_i diag(Cayley blocks) P_iᵀ, built from PEFT's own permutation, permutation
    matrix and Cayley functions (PEFT 0.21 multiplies m > 1 factors only in its CUDA kernel, so its layer
    cannot be run here); the forward and the merged weight use it."""
    from peft.tuners.boft.layer import BOFTLayer

    cfg = build_dataclass(boft.BOFTConfig, {"block_size": 4, "n_butterfly_factor": factors}, "peft")
    ours = boft.BOFTLinear(torch.nn.Linear(64, 32), cfg, "layer").eval()
    with torch.no_grad():
        ours.boft_R.normal_(generator=torch.Generator().manual_seed(2))
        ours.boft_s.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(3))
    m, d, b, _ = ours.boft_R.shape
    rot = BOFTLayer.cayley_batch(None, ours.boft_R.detach().view(m * d, b, b)).view(m, d, b, b)
    want = torch.eye(64)
    for i in range(m):
        p = BOFTLayer.perm2mat(None, BOFTLayer.block_butterfly_perm(None, 64, d // 2**i, b // 2, m - 1))
        want = p @ torch.block_diag(*rot[i]) @ p.T @ want
    with torch.no_grad():
        got = ours.rotate(torch.eye(64), ours.rotations())
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        x = torch.randn(3, 64, generator=torch.Generator().manual_seed(4))
        base = ours.base_layer
        expect = (x @ want) @ base.weight.T * ours.boft_s.flatten() + base.bias
        torch.testing.assert_close(ours(x), expect, atol=1e-5, rtol=0)
        ours.merge()
        torch.testing.assert_close(ours(x), expect, atol=1e-5, rtol=0)


def test_vblora_loads_peft_top_k_only_files(tmp_path):
    """PEFT's save_only_topk_weights file (indices + k-1 weights, no logits) gives PEFT's logits; training it
    further is refused with a clear error (its logits are -inf outside the top k)."""
    import peft

    theirs = peft.get_peft_model(small_model("llama", initializer_range=0.02), peft.VBLoRAConfig(
        r=4, num_vectors=16, vector_length=16, topk=3, target_modules=["q_proj", "down_proj"], save_only_topk_weights=True))
    perturb(theirs, std=0.1)
    theirs.save_pretrained(tmp_path)
    ours = small_model("llama", initializer_range=0.02)
    cfg = load_adapter(ours, tmp_path)
    batch = batch_of(2)
    theirs.eval()
    torch.testing.assert_close(batch_logits(ours, batch), batch_logits(theirs, batch), atol=1e-5, rtol=1e-5)
    with pytest.raises(ConfigError, match="save_only_topk_weights"):
        train_steps(ours, cfg, batch, steps=1, lr=1e-3)


def test_trainable_tokens_train_only_their_rows():
    ids = [5, 9, 300]
    model, _, cfg = with_method(small_model("llama"), "trainable_tokens", token_indices=ids)
    base = small_model("llama")
    batch = batch_of(0)
    batch["input_ids"][:, :3] = torch.tensor(ids)
    train_steps(model, cfg, batch, steps=3, lr=0.1)
    probe = torch.arange(1024)
    with torch.no_grad():
        got, want = model.get_input_embeddings()(probe), base.get_input_embeddings()(probe)
    changed = sorted(torch.nonzero((got != want).any(-1)).flatten().tolist())
    assert changed == ids
    api.merge(model, cfg)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # the tie survives the merge
    torch.testing.assert_close(model.model.embed_tokens.weight[ids], got[ids], atol=0, rtol=0)


@pytest.mark.parametrize("method,options,match", [
    ("oft", {"block_size": 24}, r"peft.block_size=24 does not split the 64 inputs"),
    ("oft", {"r": 4, "block_size": 16}, r"exactly one of peft.r"),
    ("boft", {"block_size": 4, "n_butterfly_factor": 6}, r"n_butterfly_factor=6 does not fit the 64 inputs"),
    ("hra", {"r": 3}, r"peft.r must be even for hra"),
    ("vblora", {"vector_length": 24}, r"peft.vector_length=24 does not divide the shape"),
    ("fourierft", {"n_frequency": 5000}, r"peft.n_frequency=5000 exceeds the 4096 entries"),
    ("lokr", {"init": "zeros"}, r"peft.init must be 'default' or 'lycoris'"),
    ("loha", {"rank_dropout": 1.0}, r"peft.rank_dropout must be in \[0, 1\)"),
    ("trainable_tokens", {}, r"peft.token_indices is empty"),
    ("trainable_tokens", {"token_indices": [3, 5000]}, r"5000, outside the 1024 rows"),
    ("trainable_tokens", {"token_indices": [3], "targets": ["embed_tokens", "lm_head"]}, r"share one weight"),
    ("ln_tuning", {"targets": ["rotary_emb"]}, r"'model.rotary_emb', which has no parameters"),
])
def test_bad_settings_name_the_key(method, options, match):
    with pytest.raises(ConfigError, match=match):
        with_method(small_model("llama"), method, **options)
