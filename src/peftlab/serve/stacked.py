"""The stacked LoRA layer of multi-adapter serving: one frozen linear layer, every loaded adapter.

S-LoRA (Sheng et al., arXiv:2311.03285) and Punica (Chen et al., arXiv:2310.18547): one copy of
the base serves every adapter; each row b of a batch picks its own adapter a(b) (or none):

    y_b = W x_b + s_a · B_a A_a x_b,     a = a(b);   no adapter: y_b = W x_b

Every loaded adapter owns a *slot*. ``MultiLoRALinear`` keeps the adapters stacked,
``stack_A`` [slots, R, in] and ``stack_B`` [slots, out, R] with R the largest rank loaded;
smaller ranks are zero-padded (zero rows of A and columns of B add exactly nothing) and slot 0 is
all zeros ("no adapter"). ``Router`` (one per model, shared by its layers) says which slot each row
uses. Three ways to run a batch (``mode``):

- ``gather`` (Punica's BGMV, in PyTorch): gather A and B per row and run two batched matmuls,
  ``h = bmm(x [b,T,in], A[slot]ᵀ [b,in,R])``, ``y = bmm(h, B[slot]ᵀ [b,R,out]) · s[slot]``;
  one kernel launch for any mix, at the padded rank.
- ``grouped`` (S-LoRA/SGMV-like): one pair of matmuls per distinct adapter on its rows, at that
  adapter's own rank (no padding waste; a launch per adapter).
- ``auto``: a plain matmul when the whole batch uses one adapter, ``gather`` otherwise.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError
from ..model.targets import linear_shape

MODES = ("auto", "gather", "grouped")


class Router:
    """Which slot each row uses, shared by every wrapped layer of one model.

    ``rows`` [batch] (long) for per-row adapters, or ``single`` (one slot for the whole batch).
    """

    def __init__(self, mode: str = "auto"):
        if mode not in MODES:
            raise ConfigError(f"multi-adapter mode {mode!r} is not one of {', '.join(MODES)}")
        self.mode = mode
        self.single: int = 0
        self.rows: torch.Tensor | None = None


class MultiLoRALinear(nn.Module):
    """A frozen linear layer (``nn.Linear`` or GPT-2 ``Conv1D``) plus stacked LoRA adapters.

    x [..., in] -> [..., out]. With per-row routing the leading dimension of x is the batch.
    """

    def __init__(self, base_layer: nn.Module, router: Router, dtype: torch.dtype):
        super().__init__()
        self.base_layer = base_layer
        self.router = router
        self.in_features, self.out_features = linear_shape(base_layer)
        device = base_layer.weight.device
        self.register_buffer("stack_A", torch.zeros(1, 0, self.in_features, device=device, dtype=dtype),
                             persistent=False)
        self.register_buffer("stack_B", torch.zeros(1, self.out_features, 0, device=device, dtype=dtype),
                             persistent=False)
        self.register_buffer("stack_scale", torch.zeros(1, device=device, dtype=torch.float32), persistent=False)
        self.ranks: dict[int, int] = {}  # slot -> rank of the adapter in this layer

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    def _grow(self, slots: int, rank: int) -> None:
        s0, r0 = self.stack_A.shape[0], self.stack_A.shape[1]
        if slots <= s0 and rank <= r0:
            return
        slots, rank = max(slots, s0), max(rank, r0)
        a = self.stack_A.new_zeros(slots, rank, self.in_features)
        b = self.stack_B.new_zeros(slots, self.out_features, rank)
        s = self.stack_scale.new_zeros(slots)
        a[:s0, :r0] = self.stack_A
        b[:s0, :, :r0] = self.stack_B
        s[:s0] = self.stack_scale
        self.stack_A, self.stack_B, self.stack_scale = a, b, s

    def ensure_slots(self, slots: int) -> None:
        """Room for ``slots`` slots (every layer of a model has the same number, so any slot index
        routes safely to every layer: a slot this layer does not use holds zeros)."""
        self._grow(slots, 0)

    @torch.no_grad()
    def set_slot(self, slot: int, A: torch.Tensor, B: torch.Tensor, scaling: float) -> None:
        """Put adapter ``A`` [r, in], ``B`` [out, r] with scaling s into ``slot``."""
        r = A.shape[0]
        assert A.shape == (r, self.in_features) and B.shape == (self.out_features, r), (A.shape, B.shape)
        self._grow(slot + 1, r)
        self.stack_A[slot].zero_()
        self.stack_B[slot].zero_()
        self.stack_A[slot, :r] = A.to(self.stack_A)
        self.stack_B[slot, :, :r] = B.to(self.stack_B)
        self.stack_scale[slot] = scaling
        self.ranks[slot] = r

    @torch.no_grad()
    def clear_slot(self, slot: int) -> None:
        if slot in self.ranks:
            self.stack_A[slot].zero_()
            self.stack_B[slot].zero_()
            self.stack_scale[slot] = 0.0
            del self.ranks[slot]

    def factors(self, slot: int) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """(A [r, in], B [out, r], s) of the adapter in ``slot``, or None if it skips this layer."""
        r = self.ranks.get(slot)
        if r is None:
            return None
        return self.stack_A[slot, :r], self.stack_B[slot, :, :r], float(self.stack_scale[slot])

    def delta_weight(self, slot: int) -> torch.Tensor:
        """s·BA [out, in] in fp32 (zeros when the adapter skips this layer)."""
        f = self.factors(slot)
        if f is None:
            return torch.zeros(self.out_features, self.in_features, device=self.stack_A.device)
        a, b, s = f
        return (b.float() @ a.float()) * s

    def _one(self, x: torch.Tensor, slot: int) -> torch.Tensor | None:
        f = self.factors(slot)
        if f is None:
            return None
        a, b, s = f
        return ((x @ a.T) @ b.T) * s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        router = self.router
        if not self.ranks:
            return result
        xa = x.to(self.stack_A.dtype)
        rows = router.rows
        if rows is None:
            lora = self._one(xa, router.single) if router.single else None
            return result if lora is None else result + lora.to(result.dtype)
        batch = x.shape[0]
        assert rows.shape == (batch,), (rows.shape, x.shape)
        if router.mode == "grouped":
            out = torch.zeros_like(result, dtype=xa.dtype)
            for slot in rows.unique().tolist():
                if slot not in self.ranks:
                    continue
                idx = (rows == slot).nonzero().flatten()
                out.index_copy_(0, idx, self._one(xa.index_select(0, idx), slot))
            return result + out.to(result.dtype)
        x3 = xa.reshape(batch, -1, self.in_features)  # [b, T, in]
        a = self.stack_A.index_select(0, rows)  # [b, R, in]
        b = self.stack_B.index_select(0, rows)  # [b, out, R]
        h = torch.bmm(x3, a.transpose(1, 2))  # [b, T, R]
        y = torch.bmm(h, b.transpose(1, 2)) * self.stack_scale.index_select(0, rows).to(h.dtype)[:, None, None]
        return result + y.reshape(result.shape).to(result.dtype)

    def extra_repr(self) -> str:
        return f"adapters={len(self.ranks)}, max_rank={self.stack_A.shape[1]}"
