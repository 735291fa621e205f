"""Triton kernels of the mesh-free jets: ``msconv::mf_jets`` forward and its adjoint.

Forward (``msconv.reference.mf_jets_ref``)::

    J[n, c*M + m, i, j] = sum_t sum_q filt[b_m, t] * filt[a_m, q] * xp[n, c, i*S + t, j*S + q]

One program owns a BLOCK_I x BLOCK_J tile of output pixels of one (n, c) plane and all M jets.
It walks the (BLOCK_I - 1)*S + K input rows under the tile once: each row is filtered
horizontally (per jet m, taps filt[a_m]) into registers and added to the output rows that read it
with weight filt[b_m, y - i*S]. The horizontal result never leaves registers.

Adjoint (gradient w.r.t. xp) is a gather: one program owns a tile of input pixels and sums over
the output rows i (and columns j) that touched them; no atomics, deterministic.

Accumulation in float32 (float64 for float64 inputs). Runs on CUDA tensors, and on CPU tensors
when ``TRITON_INTERPRET=1`` is set before Triton is imported (how CI tests it).
"""
from __future__ import annotations

import contextlib
import os

import torch

from msconv.triton import HAS_TRITON, tl, triton

__all__ = ["HAS_TRITON", "mf_jets_fwd_triton", "mf_jets_adj_triton"]

# Elements of the largest register tile per program (BLOCK_M x tile). The interpreter runs one
# program at a time on numpy arrays, so there fewer, larger programs are much faster.
_BUDGET_GPU = 4096
_BUDGET_INTERPRET = 16384


if HAS_TRITON:

    @triton.jit
    def _mf_jets_fwd_kernel(
        x_ptr,  # (N, C, Hp, Wp) padded input, any strides
        f_ptr,  # (P1, K) filters in the accumulation dtype, contiguous
        ja_ptr,  # (M,) int32: x-derivative order a of jet m
        jb_ptr,  # (M,) int32: y-derivative order b of jet m
        out_ptr,  # (N, C*M, Ho, Wo) jets, any strides
        C, Hp, Ho, Wo, K, S, M,
        sx_n, sx_c, sx_h, sx_w,
        so_n, so_c, so_h, so_w,
        BLOCK_M: tl.constexpr,
        BLOCK_I: tl.constexpr,
        BLOCK_J: tl.constexpr,
        ACC_FP64: tl.constexpr,
    ):  # fmt: skip
        pid = tl.program_id(0)
        n_i = tl.cdiv(Ho, BLOCK_I)
        n_j = tl.cdiv(Wo, BLOCK_J)
        t_j = pid % n_j
        rest = pid // n_j
        t_i = rest % n_i
        plane = rest // n_i  # n * C + c
        n = plane // C
        c = plane % C
        if ACC_FP64:
            acc_ty = tl.float64
        else:
            acc_ty = tl.float32

        offs_m = tl.arange(0, BLOCK_M)  # (BLOCK_M,)
        mask_m = offs_m < M
        a_m = tl.load(ja_ptr + offs_m, mask=mask_m, other=0)
        b_m = tl.load(jb_ptr + offs_m, mask=mask_m, other=0)
        offs_i = t_i * BLOCK_I + tl.arange(0, BLOCK_I)  # (BLOCK_I,)
        offs_j = t_j * BLOCK_J + tl.arange(0, BLOCK_J)  # (BLOCK_J,)
        mask_i = offs_i < Ho
        mask_j = offs_j < Wo
        x_plane = x_ptr + n.to(tl.int64) * sx_n + c.to(tl.int64) * sx_c
        col = (offs_j * S).to(tl.int64) * sx_w  # (BLOCK_J,)

        acc = tl.zeros([BLOCK_M, BLOCK_I, BLOCK_J], dtype=acc_ty)
        y0 = t_i * BLOCK_I * S
        for dy in range(0, (BLOCK_I - 1) * S + K):
            y = y0 + dy
            # Rows past Hp only feed output rows past Ho (masked below): clamp, do not mask.
            row = x_plane + tl.minimum(y, Hp - 1).to(tl.int64) * sx_h
            # Horizontal pass of input row y for every jet: h[m, j] = sum_q filt[a_m, q] x[y, jS+q]
            h = tl.zeros([BLOCK_M, BLOCK_J], dtype=acc_ty)
            for q in range(0, K):
                xv = tl.load(row + col + q * sx_w, mask=mask_j, other=0.0).to(acc_ty)
                fq = tl.load(f_ptr + a_m * K + q, mask=mask_m, other=0.0)  # (BLOCK_M,)
                h += fq[:, None] * xv[None, :]
            # Vertical pass: output row i reads input row y with tap t = y - i*S.
            t = y - offs_i * S  # (BLOCK_I,)
            ok_t = mask_i & (t >= 0) & (t < K)
            wv = tl.load(f_ptr + b_m[:, None] * K + t[None, :], mask=mask_m[:, None] & ok_t[None, :], other=0.0)
            acc += wv[:, :, None] * h[:, None, :]

        o_m = (c * M + offs_m).to(tl.int64) * so_c  # (BLOCK_M,)
        o_i = offs_i.to(tl.int64) * so_h
        o_j = offs_j.to(tl.int64) * so_w
        optrs = out_ptr + n.to(tl.int64) * so_n + (o_m[:, None, None] + o_i[None, :, None] + o_j[None, None, :])
        omask = mask_m[:, None, None] & mask_i[None, :, None] & mask_j[None, None, :]
        tl.store(optrs, acc.to(out_ptr.dtype.element_ty), mask=omask)

    @triton.jit
    def _mf_jets_adj_kernel(
        g_ptr,  # (N, C*M, Ho, Wo) gradient of the jets, any strides
        f_ptr,  # (P1, K) filters in the accumulation dtype, contiguous
        ja_ptr,  # (M,) int32
        jb_ptr,  # (M,) int32
        out_ptr,  # (N, C, Hp, Wp) gradient of xp, any strides
        C, Hp, Wp, Ho, Wo, K, S, M,
        sg_n, sg_c, sg_h, sg_w,
        so_n, so_c, so_h, so_w,
        BLOCK_M: tl.constexpr,
        BLOCK_Y: tl.constexpr,
        BLOCK_X: tl.constexpr,
        ACC_FP64: tl.constexpr,
    ):  # fmt: skip
        pid = tl.program_id(0)
        n_y = tl.cdiv(Hp, BLOCK_Y)
        n_x = tl.cdiv(Wp, BLOCK_X)
        t_x = pid % n_x
        rest = pid // n_x
        t_y = rest % n_y
        plane = rest // n_y
        n = plane // C
        c = plane % C
        if ACC_FP64:
            acc_ty = tl.float64
        else:
            acc_ty = tl.float32

        offs_m = tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        a_m = tl.load(ja_ptr + offs_m, mask=mask_m, other=0)
        b_m = tl.load(jb_ptr + offs_m, mask=mask_m, other=0)
        offs_y = t_y * BLOCK_Y + tl.arange(0, BLOCK_Y)  # (BLOCK_Y,)
        offs_x = t_x * BLOCK_X + tl.arange(0, BLOCK_X)  # (BLOCK_X,)
        mask_x = offs_x < Wp
        g_jets = g_ptr + n.to(tl.int64) * sg_n + ((c * M + offs_m).to(tl.int64) * sg_c)[:, None]  # (BLOCK_M, 1)

        acc = tl.zeros([BLOCK_Y, BLOCK_X], dtype=acc_ty)
        y0 = t_y * BLOCK_Y
        # Output rows i with i*S <= y < i*S + K for some y of the tile.
        i_lo = tl.maximum((y0 - K + S) // S, 0)
        i_hi = tl.minimum((y0 + BLOCK_Y - 1) // S, Ho - 1)
        for i in range(i_lo, i_hi + 1):
            # Horizontal adjoint of output row i: u[m, x] = sum_q filt[a_m, q] G[m, i, (x - q)/S]
            u = tl.zeros([BLOCK_M, BLOCK_X], dtype=acc_ty)
            for q in range(0, K):
                xq = offs_x - q
                jj = xq // S
                ok = mask_x & (xq >= 0) & (xq % S == 0) & (jj < Wo)
                gv = tl.load(g_jets + tl.cast(i, tl.int64) * sg_h + (jj.to(tl.int64) * sg_w)[None, :],
                             mask=mask_m[:, None] & ok[None, :], other=0.0).to(acc_ty)
                fq = tl.load(f_ptr + a_m * K + q, mask=mask_m, other=0.0)
                u += fq[:, None] * gv
            # Vertical adjoint: input row y takes tap t = y - i*S of filt[b_m].
            t = offs_y - i * S
            ok_t = (t >= 0) & (t < K)
            wv = tl.load(f_ptr + b_m[:, None] * K + t[None, :], mask=mask_m[:, None] & ok_t[None, :], other=0.0)
            acc += tl.sum(wv[:, :, None] * u[:, None, :], axis=0)

        optrs = (out_ptr + n.to(tl.int64) * so_n + c.to(tl.int64) * so_c
                 + offs_y.to(tl.int64)[:, None] * so_h + offs_x.to(tl.int64)[None, :] * so_w)
        omask = (offs_y < Hp)[:, None] & mask_x[None, :]
        tl.store(optrs, acc.to(out_ptr.dtype.element_ty), mask=omask)


def _pow2(n: int) -> int:
    p = 1
    while p < n:
        p *= 2
    return p


def _tile(bm: int, rows: int, cols: int, budget: int) -> tuple[int, int]:
    """(block_rows, block_cols), powers of two, block_m * rows * cols <= budget."""
    bc = min(_pow2(cols), max(1, budget // bm), 64)
    br = min(_pow2(rows), max(1, budget // (bm * bc)))
    return br, bc


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _prepare(t: torch.Tensor, filt: torch.Tensor, order: int, name: str):
    if not HAS_TRITON:
        raise ImportError(
            "mf_jets Triton backend needs Triton: `pip install triton` (or msconv[triton]), "
            "or use another backend (MSCONV_BACKEND=cpp|reference)"
        )
    if not (t.is_cuda or _interpreting()):
        raise ValueError(
            f"mf_jets Triton kernel: {name} is on {t.device}; Triton needs a CUDA tensor "
            "(or TRITON_INTERPRET=1 set before importing Triton, for CPU tensors)"
        )
    acc = torch.float64 if t.dtype == torch.float64 else torch.float32
    f = filt.to(device=t.device, dtype=acc).contiguous()
    idx = [(d - b, b) for d in range(order + 1) for b in range(d + 1)]
    ja = torch.tensor([a for a, _ in idx], dtype=torch.int32, device=t.device)
    jb = torch.tensor([b for _, b in idx], dtype=torch.int32, device=t.device)
    return f, ja, jb, len(idx), acc == torch.float64


def _fmt(t: torch.Tensor) -> torch.memory_format:
    cl = t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
    return torch.channels_last if cl else torch.contiguous_format


def mf_jets_fwd_triton(xp: torch.Tensor, filt: torch.Tensor, order: int, stride: int) -> torch.Tensor:
    """Triton implementation of ``torch.ops.msconv.mf_jets_fwd``.

    Args:
        xp: (N, C, Hp, Wp) float16/bfloat16/float32/float64, any strides.
        filt: (order + 1, K) correlation filters, any float dtype.
    Returns:
        (N, C*M, Ho, Wo), ``Ho = (Hp - K)//stride + 1``; channels_last when ``xp`` is.
    """
    f, ja, jb, m, fp64 = _prepare(xp, filt, order, "xp")
    n, c, hp, wp = xp.shape
    k = f.shape[1]
    ho, wo = (hp - k) // stride + 1, (wp - k) // stride + 1
    out = torch.empty((n, c * m, ho, wo), dtype=xp.dtype, device=xp.device, memory_format=_fmt(xp))
    if out.numel() == 0:
        return out
    bm = _pow2(m)
    bi, bj = _tile(bm, ho, wo, _BUDGET_INTERPRET if xp.device.type == "cpu" else _BUDGET_GPU)
    grid = (n * c * triton.cdiv(ho, bi) * triton.cdiv(wo, bj),)
    with torch.cuda.device(xp.device) if xp.is_cuda else contextlib.nullcontext():
        _mf_jets_fwd_kernel[grid](
            xp, f, ja, jb, out,
            c, hp, ho, wo, k, stride, m,
            *xp.stride(), *out.stride(),
            BLOCK_M=bm, BLOCK_I=bi, BLOCK_J=bj, ACC_FP64=fp64,
        )  # fmt: skip
    return out


def mf_jets_adj_triton(grad: torch.Tensor, filt: torch.Tensor, order: int, stride: int, hp: int, wp: int) -> torch.Tensor:
    """Triton implementation of ``torch.ops.msconv.mf_jets_adj``: (N, C*M, Ho, Wo) -> (N, C, hp, wp)."""
    f, ja, jb, m, fp64 = _prepare(grad, filt, order, "grad")
    grad = grad.contiguous(memory_format=_fmt(grad))  # the gradient of sum() has stride 0
    n, cm, ho, wo = grad.shape
    c = cm // m
    k = f.shape[1]
    out = torch.empty((n, c, hp, wp), dtype=grad.dtype, device=grad.device, memory_format=_fmt(grad))
    if out.numel() == 0:
        return out
    bm = _pow2(m)
    by, bx = _tile(bm, hp, wp, _BUDGET_INTERPRET if grad.device.type == "cpu" else _BUDGET_GPU)
    grid = (n * c * triton.cdiv(hp, by) * triton.cdiv(wp, bx),)
    with torch.cuda.device(grad.device) if grad.is_cuda else contextlib.nullcontext():
        _mf_jets_adj_kernel[grid](
            grad, f, ja, jb, out,
            c, hp, wp, ho, wo, k, stride, m,
            *grad.stride(), *out.stride(),
            BLOCK_M=bm, BLOCK_Y=by, BLOCK_X=bx, ACC_FP64=fp64,
        )  # fmt: skip
    return out
