"""LM head + cross-entropy in row chunks, without keeping vocabulary-sized logits for backward.

For N label positions with hidden states h [N, d], head weight W [V, d] (optional bias b [V])
and targets y [N]:

    z_i  = post(h_i W^T + b)                     post: optional logit scale and soft-capping
    loss = sum_i  w_i * (logsumexp(z_i) - z_i[y_i])                  (w_i = 1 without weights)
    dL/dz_i = w_i * (softmax(z_i) - onehot(y_i))

The plain computation keeps every chunk's [rows, V] fp32 logits (and their softmax) alive until
backward: for 2,048 rows of a 49,152 vocabulary that is ~0.8 GB. Here each chunk's gradient
with respect to h (and W, when it trains) is computed right away in the forward pass, from
the chunk's logits, which are then freed; backward only scales the stored gradients by the
incoming scalar. Peak extra memory is one chunk of logits plus dL/dh [N, d] (and dL/dW [V, d]
when the head trains). The FLOPs are those of the plain forward + backward: nothing is
recomputed.

Under autocast the three GEMMs run in the autocast dtype (as ``nn.Linear`` would) and the
softmax in fp32, so the result equals the plain path's within rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def head_post(model) -> tuple[float, float | None]:
    """(multiplier, soft-cap) that the model's own forward applies to its logits."""
    cfg = model.config
    mult = 1.0
    scale = getattr(cfg, "logit_scale", None)  # Cohere
    if scale is not None:
        mult *= float(scale)
    scaling = getattr(cfg, "logits_scaling", None)  # Granite
    if scaling is not None:
        mult /= float(scaling)
    cap = getattr(cfg, "final_logit_softcapping", None)  # Gemma 2/3
    return mult, (float(cap) if cap is not None else None)


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    dev = t.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return t.dtype


def _chunk_loss_and_grad(logits: torch.Tensor, y: torch.Tensor, w: torch.Tensor | None, mult: float,
                         cap: float | None, need_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """logits [n, V] fp32 (owned: modified in place) -> (loss sum, dL/dlogits [n, V] fp32 or None)."""
    z = logits
    if mult != 1.0:
        z.mul_(mult)
    t = None
    if cap is not None:
        t = torch.tanh(z / cap)
        z = t * cap
    lse = torch.logsumexp(z, dim=-1)  # [n]
    token_loss = lse - z.gather(1, y[:, None]).squeeze(1)
    loss = (token_loss * w).sum() if w is not None else token_loss.sum()
    if not need_grad:
        return loss, None
    grad = z.sub_(lse[:, None]).exp_()  # softmax, in place
    grad.scatter_add_(1, y[:, None], grad.new_full((y.numel(), 1), -1.0))
    if w is not None:
        grad.mul_(w[:, None])
    if t is not None:
        grad.mul_(1.0 - t * t)
    if mult != 1.0:
        grad.mul_(mult)
    return loss, grad


def _loss_and_grads(h, weight, bias, y, w, chunk, mult, cap, need_h, need_w, need_b):
    """The chunk loop: (loss sum, dL/dh or None, dL/dW fp32 or None, dL/db fp32 or None)."""
    cdt = _compute_dtype(h)
    need = need_h or need_w or need_b
    with torch.autocast(h.device.type, enabled=False):
        wc = weight.to(cdt)
        bc = bias.to(cdt) if bias is not None else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        gh = torch.empty(h.shape, dtype=h.dtype, device=h.device) if need_h else None
        gw = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if need_w else None
        gb = torch.zeros(bias.shape, dtype=torch.float32, device=h.device) if need_b else None
        for s in range(0, h.shape[0], chunk):
            hc = h[s:s + chunk].to(cdt)
            logits = F.linear(hc, wc, bc).float()
            loss, g = _chunk_loss_and_grad(logits, y[s:s + chunk], None if w is None else w[s:s + chunk],
                                           mult, cap, need)
            total += loss
            if g is None:
                continue
            gc = g.to(cdt)
            del g, logits
            if need_h:
                gh[s:s + chunk] = (gc @ wc).to(h.dtype)
            if need_w:
                if cdt == torch.float32:
                    gw.addmm_(gc.T, hc)
                else:
                    gw.add_((gc.T @ hc).float())
            if need_b:
                gb.add_(gc.float().sum(0))
    return total, gh, gw, gb


class _ChunkedLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, bias, y, w, chunk, mult, cap):
        need_b = bias is not None and ctx.needs_input_grad[2]
        total, gh, gw, gb = _loss_and_grads(h, weight, bias, y, w, chunk, mult, cap,
                                            ctx.needs_input_grad[0], ctx.needs_input_grad[1], need_b)
        ctx.save_for_backward(gh, gw, gb)
        ctx.weight_dtype = weight.dtype
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return total

    @staticmethod
    def backward(ctx, grad_out):
        gh, gw, gb = ctx.saved_tensors
        gh = gh * grad_out.to(gh.dtype) if gh is not None else None
        gw = (gw * grad_out).to(ctx.weight_dtype) if gw is not None else None
        gb = (gb * grad_out).to(ctx.bias_dtype) if gb is not None else None
        return gh, gw, gb, None, None, None, None, None


def chunked_linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                                 targets: torch.Tensor, weights: torch.Tensor | None = None, chunk: int = 1024,
                                 mult: float = 1.0, cap: float | None = None) -> torch.Tensor:
    """Sum over rows of (optionally weighted) cross-entropy of ``post(h W^T + b)`` against ``targets``.

    h [N, d], weight [V, d], bias [V] or None, targets [N] (all valid: select label positions
    first), weights [N] float or None. Returns a scalar fp32 tensor whose backward gives the
    same gradients as the plain ``F.cross_entropy(F.linear(h, W, b).float(), y, reduction="sum")``.
    """
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    if weights is not None:
        weights = weights.float()
    grads = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (h, weight, bias))
    if not grads:  # evaluation: the loss alone, no gradient buffers
        return _loss_and_grads(h, weight, bias, targets, weights, chunk, mult, cap, False, False, False)[0]
    return _ChunkedLinearCE.apply(h, weight, bias, targets, weights, chunk, mult, cap)


def fused_head_loss(model, h: torch.Tensor, y: torch.Tensor, w: torch.Tensor | None = None,
                    chunk: int = 1024) -> torch.Tensor | None:
    """The model's LM head + CE over label rows h [N, d], or None when the head is not a plain
    linear layer (then the caller uses the plain path)."""
    head = model.get_output_embeddings()
    if type(head) is not torch.nn.Linear:
        return None
    mult, cap = head_post(model)
    return chunked_linear_cross_entropy(h, head.weight, head.bias, y, w, chunk, mult, cap)
