"""Triton kernel of ``msconv::resample2d_chain``: successive separable 2-D resamplings.

Level ``l + 1`` is computed from level ``l`` (level 0 is ``x``) as::

    out[n, c, I, J] = sum_b wx[l][J, b] * sum_a wy[l][I, a] * in[n, c, iy[l][I, a], ix[l][J, b]]

with the 1-D operators given as padded sparse rows (int32 tap index, float32 tap weight; padded
taps have weight 0). Same semantics, summation order and memory-format rule as the CPU kernel in
``csrc/resample2d_cpu.cpp``.

Runs on CUDA tensors, and on CPU tensors when ``TRITON_INTERPRET=1`` is set before Triton is
imported (how CI tests it).
"""
from __future__ import annotations

import contextlib
import os

import torch

from msconv.triton import HAS_TRITON, tl, triton

__all__ = ["HAS_TRITON", "MAX_TAPS", "resample2d_chain_triton"]

# Taps per output row/column are compile-time constants (fully unrolled loops); every operator
# msconv builds has at most 4.
MAX_TAPS = 8

# Output elements per program. The interpreter runs one program at a time on numpy arrays, so
# there fewer, larger programs are much faster.
_TILE_GPU = 1024
_TILE_INTERPRET = 8192


if HAS_TRITON:

    @triton.jit
    def _resample2d_kernel(
        x_ptr,  # (N, C, H, W) input level, any strides
        out_ptr,  # (N, C, Ho, Wo) output level, any strides
        iy_ptr,  # (Ho, KY) int32 row taps, contiguous
        wy_ptr,  # (Ho, KY) float32 row weights, contiguous
        ix_ptr,  # (Wo, KX) int32 column taps, contiguous
        wx_ptr,  # (Wo, KX) float32 column weights, contiguous
        C,
        H,
        W,
        Ho,
        Wo,
        sx_n,
        sx_c,
        sx_h,
        sx_w,
        so_n,
        so_c,
        so_h,
        so_w,
        KY: tl.constexpr,
        KX: tl.constexpr,
        BLOCK_I: tl.constexpr,
        BLOCK_J: tl.constexpr,
        BLOCK_C: tl.constexpr,
        CHANNELS_LAST: tl.constexpr,
        ACC_FP64: tl.constexpr,
    ):
        # One program = one (n) and a BLOCK_I x BLOCK_J x BLOCK_C tile of (I, J, c). Programs are
        # numbered in the output's memory order so neighbouring programs touch neighbouring memory.
        pid = tl.program_id(0)
        n_i = tl.cdiv(Ho, BLOCK_I)
        n_j = tl.cdiv(Wo, BLOCK_J)
        n_c = tl.cdiv(C, BLOCK_C)
        if CHANNELS_LAST:  # memory order n, I, J, c
            t_c = pid % n_c
            rest = pid // n_c
            t_j = rest % n_j
            rest = rest // n_j
            t_i = rest % n_i
            n = rest // n_i
        else:  # memory order n, c, I, J
            t_j = pid % n_j
            rest = pid // n_j
            t_i = rest % n_i
            rest = rest // n_i
            t_c = rest % n_c
            n = rest // n_c

        if ACC_FP64:
            acc_ty = tl.float64
        else:
            acc_ty = tl.float32

        offs_i = t_i * BLOCK_I + tl.arange(0, BLOCK_I)  # (BLOCK_I,)
        offs_j = t_j * BLOCK_J + tl.arange(0, BLOCK_J)  # (BLOCK_J,)
        offs_c = t_c * BLOCK_C + tl.arange(0, BLOCK_C)  # (BLOCK_C,)
        mask_i = offs_i < Ho
        mask_j = offs_j < Wo
        mask_c = offs_c < C
        n64 = n.to(tl.int64)
        # int64 offsets: a level may exceed 2**31 elements even when its index tables do not.
        x_nc = n64 * sx_n + offs_c.to(tl.int64) * sx_c  # (BLOCK_C,)

        acc = tl.zeros([BLOCK_I, BLOCK_J, BLOCK_C], dtype=acc_ty)
        for b in tl.static_range(KX):
            tap_j = tl.load(ix_ptr + offs_j * KX + b, mask=mask_j, other=0)  # (BLOCK_J,)
            w_j = tl.load(wx_ptr + offs_j * KX + b, mask=mask_j, other=0.0)  # (BLOCK_J,)
            # Weight-0 (padded) taps are not read, as on CPU; out-of-range taps are never read
            # either, so a bad table cannot fault (the op's checks reject it on CPU).
            ok_j = mask_j & (w_j != 0.0) & (tap_j >= 0) & (tap_j < W)
            x_j = tap_j.to(tl.int64) * sx_w  # (BLOCK_J,)
            # Vertical pass first, then the horizontal weight: the CPU kernel's summation order.
            col = tl.zeros([BLOCK_I, BLOCK_J, BLOCK_C], dtype=acc_ty)
            for a in tl.static_range(KY):
                tap_i = tl.load(iy_ptr + offs_i * KY + a, mask=mask_i, other=0)  # (BLOCK_I,)
                w_i = tl.load(wy_ptr + offs_i * KY + a, mask=mask_i, other=0.0)  # (BLOCK_I,)
                ok_i = mask_i & (w_i != 0.0) & (tap_i >= 0) & (tap_i < H)
                x_i = tap_i.to(tl.int64) * sx_h  # (BLOCK_I,)
                ptrs = x_ptr + (x_i[:, None, None] + x_j[None, :, None] + x_nc[None, None, :])
                ok = ok_i[:, None, None] & ok_j[None, :, None] & mask_c[None, None, :]
                v = tl.load(ptrs, mask=ok, other=0.0).to(acc_ty)
                col += w_i.to(acc_ty)[:, None, None] * v
            acc += w_j.to(acc_ty)[None, :, None] * col

        o_i = offs_i.to(tl.int64) * so_h  # (BLOCK_I,)
        o_j = offs_j.to(tl.int64) * so_w  # (BLOCK_J,)
        o_nc = n64 * so_n + offs_c.to(tl.int64) * so_c  # (BLOCK_C,)
        optrs = out_ptr + (o_i[:, None, None] + o_j[None, :, None] + o_nc[None, None, :])
        omask = mask_i[:, None, None] & mask_j[None, :, None] & mask_c[None, None, :]
        tl.store(optrs, acc.to(out_ptr.dtype.element_ty), mask=omask)


def _pow2_at_most(n: int, cap: int) -> int:
    """Smallest power of two >= n, clipped to [1, cap]."""
    p = 1
    while p < n and p < cap:
        p *= 2
    return p


def _tile(C: int, Ho: int, Wo: int, channels_last: bool, budget: int) -> tuple[int, int, int]:
    # The innermost tile axis follows the output's unit-stride axis so warps access contiguous
    # memory: J for NCHW (one channel per program), c then J for channels_last.
    if channels_last:
        bc = _pow2_at_most(C, min(64, budget))
    else:
        bc = 1
    bj = _pow2_at_most(Wo, max(1, min(128, budget // bc)))
    bi = _pow2_at_most(Ho, max(1, budget // (bc * bj)))
    return bi, bj, bc


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _check_tables(idx: torch.Tensor, w: torch.Tensor, name: str, level: int, x: torch.Tensor):
    if idx.device != x.device or w.device != x.device:
        raise ValueError(
            f"resample2d_chain: tap tables {name}[{level}] are on {idx.device}/{w.device} but x is "
            f"on {x.device}; move them to x.device"
        )
    if idx.dim() != 2 or w.shape != idx.shape:
        raise ValueError(
            f"resample2d_chain: {name}[{level}] must be 2-D index/weight tables of equal shape, "
            f"got {tuple(idx.shape)} and {tuple(w.shape)}"
        )
    if idx.dtype != torch.int32 or w.dtype != torch.float32:
        raise TypeError(
            f"resample2d_chain: {name}[{level}] tables must be int32 / float32, got "
            f"{idx.dtype} / {w.dtype}"
        )
    if idx.shape[1] > MAX_TAPS:
        raise ValueError(
            f"resample2d_chain: {name}[{level}] has {idx.shape[1]} taps per row; the Triton "
            f"kernel supports at most {MAX_TAPS}"
        )


def resample2d_chain_triton(
    x: torch.Tensor,
    iy: list[torch.Tensor],
    wy: list[torch.Tensor],
    ix: list[torch.Tensor],
    wx: list[torch.Tensor],
) -> list[torch.Tensor]:
    """Triton implementation of ``torch.ops.msconv.resample2d_chain``.

    Args:
        x: (N, C, H, W) float16/bfloat16/float32/float64, any strides.
        iy, wy: per level l, (H_{l+1}, Ky) int32 row taps and float32 weights.
        ix, wx: per level l, (W_{l+1}, Kx) int32 column taps and float32 weights.

    Returns:
        The L levels after ``x``, level l+1 of shape (N, C, H_{l+1}, W_{l+1}); channels_last when
        ``x`` is channels_last (and not also NCHW-contiguous), contiguous NCHW otherwise.
        Accumulation is float32 (float64 for float64 input). Tap indices are not range-checked
        here (that would synchronise the device); out-of-range taps contribute nothing.

    Example::

        >>> H = 4; iy = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
        >>> w = torch.full((2, 2), 0.5)
        >>> (y,) = resample2d_chain_triton(torch.ones(1, 1, H, H, device="cuda"),
        ...                                [iy.cuda()], [w.cuda()], [iy.cuda()], [w.cuda()])
        >>> y.shape
        torch.Size([1, 1, 2, 2])
    """
    if not HAS_TRITON:
        raise ImportError(
            "resample2d_chain_triton needs Triton: `pip install triton` (or msconv[triton]), "
            "or use another backend (MSCONV_BACKEND=cpp|reference)"
        )
    if x.dim() != 4:
        raise ValueError(f"resample2d_chain: x must be N x C x H x W, got {tuple(x.shape)=}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"resample2d_chain: x must be a floating tensor, got {x.dtype=}")
    if not (x.is_cuda or _interpreting()):
        raise ValueError(
            f"resample2d_chain_triton: x is on {x.device}; Triton needs a CUDA tensor "
            "(or TRITON_INTERPRET=1 set before importing Triton, for CPU tensors)"
        )
    L = len(iy)
    if not (len(wy) == L and len(ix) == L and len(wx) == L):
        raise ValueError(
            "resample2d_chain: iy, wy, ix, wx must have one table per level, got "
            f"{len(iy)}, {len(wy)}, {len(ix)}, {len(wx)}"
        )
    # Same rule as the CPU kernel and the fake kernels.
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    budget = _TILE_INTERPRET if x.device.type == "cpu" else _TILE_GPU

    for level in range(L):  # all checks before the first launch
        _check_tables(iy[level], wy[level], "iy/wy", level, x)
        _check_tables(ix[level], wx[level], "ix/wx", level, x)

    src = x
    outs: list[torch.Tensor] = []
    # Triton launches on the current device, which need not be x's.
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        for level in range(L):
            src = _resample2d_level(src, iy[level], wy[level], ix[level], wx[level], fmt, budget)
            outs.append(src)
    return outs


def _resample2d_level(
    src: torch.Tensor,  # (N, C, H, W) any strides
    iy: torch.Tensor,  # (Ho, KY) int32
    wy: torch.Tensor,  # (Ho, KY) float32
    ix: torch.Tensor,  # (Wo, KX) int32
    wx: torch.Tensor,  # (Wo, KX) float32
    fmt: torch.memory_format,
    budget: int,
) -> torch.Tensor:
    iy, wy, ix, wx = iy.contiguous(), wy.contiguous(), ix.contiguous(), wx.contiguous()
    N, C, H, W = src.shape
    Ho, Wo = iy.shape[0], ix.shape[0]
    out = torch.empty((N, C, Ho, Wo), dtype=src.dtype, device=src.device, memory_format=fmt)
    if out.numel() == 0:
        return out
    channels_last = fmt == torch.channels_last
    bi, bj, bc = _tile(C, Ho, Wo, channels_last, budget)
    grid = (N * triton.cdiv(C, bc) * triton.cdiv(Ho, bi) * triton.cdiv(Wo, bj),)
    _resample2d_kernel[grid](
        src, out, iy, wy, ix, wx,
        C, H, W, Ho, Wo,
        *src.stride(), *out.stride(),
        KY=iy.shape[1], KX=ix.shape[1],
        BLOCK_I=bi, BLOCK_J=bj, BLOCK_C=bc,
        CHANNELS_LAST=channels_last,
        ACC_FP64=src.dtype == torch.float64,
        num_warps=4,
    )  # fmt: skip
    return out
