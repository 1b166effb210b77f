"""OFT: orthogonal fine-tuning with block-diagonal rotations of a layer's input.

Qiu et al., "Controlling Text-to-Image Diffusion by Orthogonal Finetuning" (2023), arXiv:2306.07280;
Qiu et al., "Orthogonal Finetuning Made Scalable" (OFTv2, 2025), arXiv:2506.19847 (the input-side
rotation and the Cayley-Neumann series, PEFT >= 0.18's form).

    y = W (R^T x) + b,    R = diag(R_1, ..., R_n),   R_i = Cayley(Q_i)  [b_s, b_s],   n b_s = in

Each block's Q_i is skew-symmetric, built from b_s (b_s - 1) / 2 trained numbers (the strictly upper
triangle; ``oft_R.weight`` [n, b_s (b_s - 1) / 2], zero at init so R = I and the model starts as the
base). Cayley(Q) = (I - Q)(I + Q)^-1 exactly (``use_cayley_neumann=false``), or by default the
truncated Neumann series I + 2Q + 2Q² + ... + Q^(k-1) with k = ``num_cayley_neumann_terms`` (PEFT's
form, cheaper; orthogonal up to the truncation). ``block_share``: one block for all n.
``coft`` (constrained OFT): before each use, every block's Q is pulled back into the ball
||Q||_F <= eps / sqrt(n) around zero, in place. ``module_dropout`` = p: during training int(p n) random
blocks act as the identity for a step (the paper's multiplicative dropout; PEFT 0.21 creates this
layer but does not call it in its Linear forward).

Merging: W <- W R^T (a Conv1D weight [in, out]: W <- R W); exact, whatever the truncation.
Trainable per layer: in (b_s - 1) / 2 (block_share: b_s (b_s - 1) / 2). Names and files are PEFT's
(``<layer>.oft_R.weight``, peft_type ``OFT``). PEFT 0.21 has OFT for nn.Linear but not GPT-2's Conv1D.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..errors import ConfigError
from ..model.params import freeze
from ..model.targets import (
    LINEAR_TYPES,
    find_targets,
    layer_dtype_device,
    linear_shape,
    peft_target_modules,
    replace_module,
)
from ..registry import register
from . import peft_format
from .lowrank import factor_dtype, wide
from .merging import float_base, merge_wrappers
from .modules_to_save import add_additional_targets

# the Cayley-Neumann series changed in PEFT 0.18; files written in that form say so, or PEFT warns
NEUMANN_FORM_SINCE = "0.18.0"


@dataclass
class OFTConfig:
    method: str = "oft"
    r: int = 0  # number of blocks per layer (0: from block_size); set exactly one of r and block_size
    block_size: int = 32  # b_s (0: from r)
    targets: str | list[str] = "all-linear"
    module_dropout: float = 0.0  # fraction of blocks set to the identity per training step
    coft: bool = False  # constrained OFT: keep every Q within eps of zero
    eps: float = 6e-5
    block_share: bool = False  # one block shared by the whole layer
    use_cayley_neumann: bool = True  # False: the exact Cayley transform (a linear solve)
    num_cayley_neumann_terms: int = 5
    additional_targets: list[str] | None = None
    init_from: str | None = None
    merge_first: list[str] | None = None

    def validate(self) -> None:
        if (self.r != 0) == (self.block_size != 0) or self.r < 0 or self.block_size < 0:
            raise ConfigError(f"set exactly one of peft.r (blocks per layer) and peft.block_size (their size) "
                              f"to a positive value and the other to 0, got r={self.r}, block_size={self.block_size}")
        if not 0.0 <= self.module_dropout < 1.0:
            raise ConfigError(f"peft.module_dropout must be in [0, 1), got {self.module_dropout}")
        if self.num_cayley_neumann_terms < 1:
            raise ConfigError(f"peft.num_cayley_neumann_terms must be >= 1, got {self.num_cayley_neumann_terms}")


def skew(vec: torch.Tensor, size: int, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """[n, size (size-1)/2] -> [n, size, size] skew-symmetric matrices (``vec`` fills the upper triangle)."""
    m = vec.new_zeros(vec.shape[0], size, size)
    m[:, rows, cols] = vec
    return m - m.transpose(-2, -1)


def cayley(q: torch.Tensor, neumann: bool, terms: int) -> torch.Tensor:
    """[n, b, b] skew -> rotations: the Neumann series I + 2Q + 2Q² + ... + Q^(terms-1) (PEFT's
    truncation, literally) or the exact (I - Q)(I + Q)^-1."""
    eye = torch.eye(q.shape[-1], device=q.device, dtype=q.dtype).expand_as(q)
    if not neumann:
        return torch.linalg.solve(eye + q, eye - q, left=False)
    r = eye.clone()
    if terms > 1:
        r = r + 2 * q
        if terms > 2:
            power = q @ q
            r = r + 2 * power
            for _ in range(3, terms - 1):
                power = power @ q
                r = r + 2 * power
            r = r + power @ q
    return r


class OFTRotation(nn.Module):
    """The trained block parameters (``weight`` [n or 1, b (b-1)/2]) and the rotations they give."""

    def __init__(self, blocks: int, size: int, cfg: OFTConfig, device, dtype):
        super().__init__()
        self.blocks, self.size, self.cfg = blocks, size, cfg
        self.weight = nn.Parameter(torch.zeros(1 if cfg.block_share else blocks, size * (size - 1) // 2,
                                               device=device, dtype=dtype))
        rows, cols = torch.triu_indices(size, size, 1, device=device)
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)

    @torch.no_grad()
    def constrain(self) -> None:
        """COFT: every block's Q back into the Frobenius ball of radius eps / sqrt(n) (in place)."""
        q = skew(self.weight, self.size, self.rows, self.cols)
        eps = self.cfg.eps / torch.sqrt(torch.tensor(float(q.shape[0])))
        norm = torch.linalg.matrix_norm(q, keepdim=True)
        # a block already on the sphere (up to rounding) stays as it is, so a second call changes nothing
        # (PEFT rescales it again by 1 ± 1e-7 on every forward)
        q = torch.where(norm <= eps * (1 + 1e-5), q, eps * (q / norm))
        self.weight.copy_(q[:, self.rows, self.cols])

    def rotations(self, wide_: bool = False) -> torch.Tensor:
        """[n, b, b]: every block's R (the shared one repeated)."""
        if self.cfg.coft:
            self.constrain()
        w = wide(self.weight) if wide_ else self.weight
        r = cayley(skew(w, self.size, self.rows, self.cols), self.cfg.use_cayley_neumann,
                   self.cfg.num_cayley_neumann_terms)
        return r.expand(self.blocks, -1, -1) if self.cfg.block_share else r


class OFTLinear(nn.Module):
    """A frozen linear layer whose input is rotated block by block first. x [..., in] -> [..., out]."""

    def __init__(self, base_layer: nn.Module, cfg: OFTConfig, path: str):
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = linear_shape(base_layer)
        size = cfg.block_size or self.in_features // cfg.r
        if self.in_features % size or (cfg.r and self.in_features % cfg.r):
            given = f"peft.r={cfg.r}" if cfg.r else f"peft.block_size={cfg.block_size}"
            divisors = [d for d in range(2, min(self.in_features, 256) + 1) if self.in_features % d == 0]
            raise ConfigError(f"{given} does not split the {self.in_features} inputs of {path!r} into equal "
                              f"blocks; choose a divisor of {self.in_features} (e.g. {divisors[-6:]}) or other targets")
        dtype, device = layer_dtype_device(base_layer)
        self.oft_R = OFTRotation(self.in_features // size, size, cfg, device, factor_dtype(dtype))
        self.module_dropout = cfg.module_dropout
        self.merged = False

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x)
        rot = self.oft_R.rotations()  # [n, b, b]
        if self.training and self.module_dropout:
            n, b = rot.shape[0], rot.shape[-1]
            off = torch.randperm(n, device=rot.device)[: int(self.module_dropout * n)]
            keep = torch.ones(n, 1, 1, device=rot.device, dtype=rot.dtype)
            keep[off] = 0
            rot = keep * rot + (1 - keep) * torch.eye(b, device=rot.device, dtype=rot.dtype)
        h = x.to(rot.dtype).unflatten(-1, (rot.shape[0], rot.shape[-1]))
        h = torch.einsum("...nk,nkc->...nc", h, rot).flatten(-2)  # x' = R^T x, block by block
        return self.base_layer(h.to(x.dtype))

    @torch.no_grad()
    def merge(self) -> None:
        """W <- W R^T ([out, in]); a Conv1D's [in, out] weight: W <- R W."""
        if self.merged:
            return
        float_base(self)
        w = self.base_layer.weight
        rot = torch.block_diag(*self.oft_R.rotations(wide_=True).to(w.device))
        new = rot @ wide(w) if isinstance(self.base_layer, Conv1D) else wide(w) @ rot.T
        w.copy_(new.to(w.dtype))
        self.merged = True

    def extra_repr(self) -> str:
        return f"blocks={self.oft_R.blocks}, block_size={self.oft_R.size}, merged={self.merged}"


def apply(model: nn.Module, cfg: OFTConfig) -> None:
    freeze(model)
    for path in find_targets(model, cfg.targets, kinds=LINEAR_TYPES):
        replace_module(model, path, OFTLinear(model.get_submodule(path), cfg, path))
    add_additional_targets(model, cfg.additional_targets)


def merge(model: nn.Module) -> None:
    merge_wrappers(model, (OFTLinear,), OFTLinear.merge)


def to_peft_config(cfg: OFTConfig, model: nn.Module) -> dict:
    found = [n for n, m in model.named_modules() if isinstance(m, OFTLinear)]
    return {
        "peft_type": "OFT",
        "task_type": "CAUSAL_LM",
        "peft_version": NEUMANN_FORM_SINCE,
        "r": cfg.r,
        "oft_block_size": cfg.block_size,
        "target_modules": peft_target_modules(model, cfg.targets, found),
        "module_dropout": cfg.module_dropout,
        "coft": cfg.coft,
        "eps": cfg.eps,
        "block_share": cfg.block_share,
        "use_cayley_neumann": cfg.use_cayley_neumann,
        "num_cayley_neumann_terms": cfg.num_cayley_neumann_terms,
        "fan_in_fan_out": False,
        "bias": "none",
        "init_weights": True,
        "modules_to_save": peft_format.additional_targets_for_peft(cfg),
        "inference_mode": True,
    }


def from_peft_config(d: dict) -> OFTConfig:
    if "oft_block_size" not in d:
        raise ConfigError("adapter_config.json has no oft_block_size: it was written by PEFT < 0.14, whose OFT "
                          "weights have another form; retrain it with a newer PEFT or with peftlab")
    for key in ("layers_to_transform", "exclude_modules"):
        if d.get(key):
            raise ConfigError(f"adapter_config.json has {key}={d[key]!r}, which peftlab's OFT does not load")
    return OFTConfig(
        r=int(d.get("r", 0)), block_size=int(d["oft_block_size"]), targets=peft_format.peft_targets(d, "OFT"),
        module_dropout=float(d.get("module_dropout") or 0.0), coft=bool(d.get("coft", False)),
        eps=float(d.get("eps", 6e-5)), block_share=bool(d.get("block_share", False)),
        use_cayley_neumann=bool(d.get("use_cayley_neumann", True)),
        num_cayley_neumann_terms=int(d.get("num_cayley_neumann_terms", 5)),
        additional_targets=peft_format.additional_targets_from_peft(d),
    )


register(peft_format.family_method("oft", OFTConfig, apply, ("oft_R",), merge=merge, peft_type="OFT",
                                   to_peft_config=to_peft_config, from_peft_config=from_peft_config))
