"""torch.library glue for the xorgemm ops (schemas and their meaning: csrc/ops.cpp): fake kernels for
torch.compile, and autograd.

`xor_linear(...)` is the differentiable entry point: a torch.autograd.Function over
torch.ops.xorgemm.xor_linear whose backward computes the input gradient through the same tiles
(torch.ops.xorgemm.xor_linear_grad_input) and the bias gradient per fine-tune. The base weight and the
deltas are frozen: asking for their gradient is an error.
"""
from __future__ import annotations

import torch

from xorgemm._native import C  # noqa: F401  (loading the extension registers torch.ops.xorgemm)
from xorgemm.format.layout import DEFAULT_TILE

_ops = torch.ops.xorgemm


@torch.library.register_fake("xorgemm::xor_linear")
def _xor_linear_fake(x, base, sections, tile_offsets, row_finetune, bias, tile_rows, tile_cols):
    torch._check(x.shape[-1] == base.shape[1], lambda: "x and the weight disagree on in_features")
    return x.new_empty((*x.shape[:-1], base.shape[0]))


@torch.library.register_fake("xorgemm::xor_linear_slots")
def _xor_linear_slots_fake(x, base, slot_table, row_slot, bias, tile_rows, tile_cols):
    torch._check(x.shape[-1] == base.shape[1], lambda: "x and the weight disagree on in_features")
    return x.new_empty((*x.shape[:-1], base.shape[0]))


@torch.library.register_fake("xorgemm::apply_section")
def _apply_section_fake(section, offsets, base, out, tile_rows, tile_cols):
    return None


@torch.library.register_fake("xorgemm::xor_linear_grad_input")
def _xor_linear_grad_input_fake(grad_y, base, sections, tile_offsets, row_finetune, tile_rows, tile_cols):
    return grad_y.new_empty((*grad_y.shape[:-1], base.shape[1]))


class XorLinearFunction(torch.autograd.Function):
    """y = x @ W_d^T + b_d with W_d = base XOR delta d, per row; gradients for x and the bias only."""

    @staticmethod
    def forward(ctx, x, bias, base, sections, tile_offsets, row_finetune, tile_rows, tile_cols):
        ctx.save_for_backward(base, row_finetune, *sections, *tile_offsets)
        ctx.n_finetunes = len(sections)
        ctx.tile = (tile_rows, tile_cols)
        ctx.bias_shape = None if bias is None else bias.shape
        return _ops.xor_linear(x, base, list(sections), list(tile_offsets), row_finetune, bias, tile_rows, tile_cols)

    @staticmethod
    def backward(ctx, grad_y):
        base, row_finetune, *rest = ctx.saved_tensors
        sections, offsets = rest[: ctx.n_finetunes], rest[ctx.n_finetunes:]
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = _ops.xor_linear_grad_input(grad_y.contiguous(), base, list(sections), list(offsets), row_finetune,
                                                *ctx.tile)
        if ctx.needs_input_grad[1]:
            g2 = grad_y.reshape(-1, grad_y.shape[-1])
            if len(ctx.bias_shape) == 1:
                grad_bias = g2.sum(0)
            else:  # one bias row per group: base rows use row 0, fine-tune f rows row f + 1
                ids = (row_finetune + 1 if row_finetune is not None
                       else torch.full((g2.shape[0],), ctx.n_finetunes, dtype=torch.long, device=g2.device))
                grad_bias = torch.zeros(ctx.bias_shape, dtype=g2.dtype, device=g2.device).index_add_(0, ids, g2)
        if any(ctx.needs_input_grad[2:]):
            raise RuntimeError("xorgemm: the base weight and the deltas of an XorLinear are frozen; they have no "
                               "gradient (train the inputs or the bias)")
        return grad_x, grad_bias, None, None, None, None, None, None


def xor_linear(x, base, sections, tile_offsets, row_finetune=None, bias=None, *, tile=DEFAULT_TILE):
    """Differentiable xor_linear; see csrc/ops.cpp for the arguments."""
    if base.requires_grad:
        raise RuntimeError("xorgemm: the base weight of an XorLinear is frozen; set requires_grad=False")
    if not torch.is_grad_enabled() or not (x.requires_grad or (bias is not None and bias.requires_grad)):
        # Inference: no graph to record, so the op directly (the autograd.Function costs microseconds a call).
        return _ops.xor_linear(x, base, list(sections), list(tile_offsets), row_finetune, bias, int(tile[0]),
                               int(tile[1]))
    return XorLinearFunction.apply(x, bias, base, tuple(sections), tuple(tile_offsets), row_finetune, int(tile[0]),
                                   int(tile[1]))
