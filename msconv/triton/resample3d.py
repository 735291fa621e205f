"""Triton kernel of ``msconv::resample3d_chain``: successive separable 3-D resamplings.

Level ``l + 1`` is computed from level ``l`` (level 0 is ``x``) as::

    out[n, c, Z, I, J] = sum_b wx[J, b] * sum_a sum_e wz[Z, a] * wy[I, e]
                         * in[n, c, iz[Z, a], iy[I, e], ix[J, b]]

with the 1-D operators given as padded sparse rows (int32 tap index, float32 tap weight; padded
taps have weight 0; a kept axis is one tap of weight 1). Same semantics and memory-format rule
(NDHWC only when ``x`` is channels_last_3d and not also contiguous) as the CPU kernel in
``csrc/resample3d_cpu.cpp``.

Runs on CUDA tensors, and on CPU tensors when ``TRITON_INTERPRET=1`` is set before Triton is
imported (how CI tests it).
"""
from __future__ import annotations

import contextlib

import torch

from msconv.triton import HAS_TRITON, tl, triton
from msconv.triton.resample import _TILE_GPU, _TILE_INTERPRET, MAX_TAPS, _interpreting, _tile

__all__ = ["HAS_TRITON", "resample3d_chain_triton"]


if HAS_TRITON:

    @triton.jit
    def _resample3d_kernel(
        x_ptr,  # (N, C, D, H, W) input level, any strides
        out_ptr,  # (N, C, Do, Ho, Wo) output level, any strides
        iz_ptr,  # (Do, KZ) int32 slice taps, contiguous
        wz_ptr,  # (Do, KZ) float32 slice weights, contiguous
        iy_ptr,  # (Ho, KY) int32 row taps, contiguous
        wy_ptr,  # (Ho, KY) float32 row weights, contiguous
        ix_ptr,  # (Wo, KX) int32 column taps, contiguous
        wx_ptr,  # (Wo, KX) float32 column weights, contiguous
        C, D, H, W, Do, Ho, Wo,
        sx_n, sx_c, sx_d, sx_h, sx_w,
        so_n, so_c, so_d, so_h, so_w,
        KZ: tl.constexpr,
        KY: tl.constexpr,
        KX: tl.constexpr,
        BLOCK_I: tl.constexpr,
        BLOCK_J: tl.constexpr,
        BLOCK_C: tl.constexpr,
        CHANNELS_LAST: tl.constexpr,
        ACC_FP64: tl.constexpr,
    ):  # fmt: skip
        # One program = one (n, Z) and a BLOCK_I x BLOCK_J x BLOCK_C tile of (I, J, c), numbered
        # in the output's memory order so neighbouring programs touch neighbouring memory.
        pid = tl.program_id(0)
        n_i = tl.cdiv(Ho, BLOCK_I)
        n_j = tl.cdiv(Wo, BLOCK_J)
        n_c = tl.cdiv(C, BLOCK_C)
        if CHANNELS_LAST:  # memory order n, Z, I, J, c
            t_c = pid % n_c
            rest = pid // n_c
            t_j = rest % n_j
            rest = rest // n_j
            t_i = rest % n_i
            rest = rest // n_i
            z = rest % Do
            n = rest // Do
        else:  # memory order n, c, Z, I, J
            t_j = pid % n_j
            rest = pid // n_j
            t_i = rest % n_i
            rest = rest // n_i
            z = rest % Do
            rest = rest // Do
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
            # Weight-0 (padded) and out-of-range taps are never read, so a bad table cannot fault.
            ok_j = mask_j & (w_j != 0.0) & (tap_j >= 0) & (tap_j < W)
            x_j = tap_j.to(tl.int64) * sx_w  # (BLOCK_J,)
            # Slices and rows first, then the column weight: the CPU kernel's summation order.
            col = tl.zeros([BLOCK_I, BLOCK_J, BLOCK_C], dtype=acc_ty)
            for a in tl.static_range(KZ):
                # The slice tap broadcast over the rows: one cached address, vector masks only.
                z_at = z * KZ + a + offs_i * 0  # (BLOCK_I,)
                tap_z = tl.load(iz_ptr + z_at)  # (BLOCK_I,)
                w_z = tl.load(wz_ptr + z_at)  # (BLOCK_I,)
                ok_z = (w_z != 0.0) & (tap_z >= 0) & (tap_z < D)
                x_z = tap_z.to(tl.int64) * sx_d  # (BLOCK_I,)
                for e in tl.static_range(KY):
                    tap_i = tl.load(iy_ptr + offs_i * KY + e, mask=mask_i, other=0)  # (BLOCK_I,)
                    w_i = tl.load(wy_ptr + offs_i * KY + e, mask=mask_i, other=0.0)  # (BLOCK_I,)
                    ok_i = mask_i & (w_i != 0.0) & (tap_i >= 0) & (tap_i < H) & ok_z
                    x_i = x_z + tap_i.to(tl.int64) * sx_h  # (BLOCK_I,)
                    ptrs = x_ptr + (x_i[:, None, None] + x_j[None, :, None] + x_nc[None, None, :])
                    ok = ok_i[:, None, None] & ok_j[None, :, None] & mask_c[None, None, :]
                    v = tl.load(ptrs, mask=ok, other=0.0).to(acc_ty)
                    w_zi = w_z.to(acc_ty) * w_i.to(acc_ty)  # (BLOCK_I,)
                    col += w_zi[:, None, None] * v
            acc += w_j.to(acc_ty)[None, :, None] * col

        o_i = z.to(tl.int64) * so_d + offs_i.to(tl.int64) * so_h  # (BLOCK_I,)
        o_j = offs_j.to(tl.int64) * so_w  # (BLOCK_J,)
        o_nc = n64 * so_n + offs_c.to(tl.int64) * so_c  # (BLOCK_C,)
        optrs = out_ptr + (o_i[:, None, None] + o_j[None, :, None] + o_nc[None, None, :])
        omask = mask_i[:, None, None] & mask_j[None, :, None] & mask_c[None, None, :]
        tl.store(optrs, acc.to(out_ptr.dtype.element_ty), mask=omask)


def _check_tables(idx: torch.Tensor, w: torch.Tensor, name: str, level: int, x: torch.Tensor) -> None:
    where = f"resample3d_chain: {name}[{level}]"
    if idx.device != x.device or w.device != x.device:
        raise ValueError(f"{where} tables are on {idx.device}/{w.device} but x is on {x.device}; move them to x.device")
    if idx.dim() != 2 or w.shape != idx.shape or idx.dtype != torch.int32 or w.dtype != torch.float32:
        raise ValueError(f"{where} must be 2-D int32 index / float32 weight tables of equal shape, got "
                         f"{tuple(idx.shape)} {idx.dtype} and {tuple(w.shape)} {w.dtype}")
    if idx.shape[1] > MAX_TAPS:
        raise ValueError(f"{where} has {idx.shape[1]} taps per row; the Triton kernel supports at most {MAX_TAPS}")


def resample3d_chain_triton(x: torch.Tensor, iz: list[torch.Tensor], wz: list[torch.Tensor], iy: list[torch.Tensor],
                            wy: list[torch.Tensor], ix: list[torch.Tensor], wx: list[torch.Tensor]) -> list[torch.Tensor]:
    """Triton implementation of ``torch.ops.msconv.resample3d_chain``.

    Args:
        x: (N, C, D, H, W) float16/bfloat16/float32/float64, any strides.
        iz, wz: per level l, (D_{l+1}, Kz) int32 slice taps and float32 weights.
        iy, wy: per level l, (H_{l+1}, Ky) int32 row taps and float32 weights.
        ix, wx: per level l, (W_{l+1}, Kx) int32 column taps and float32 weights.

    Returns:
        The L levels after ``x``, level l+1 of shape (N, C, D_{l+1}, H_{l+1}, W_{l+1});
        channels_last_3d when ``x`` is (and not also contiguous), contiguous otherwise.
        Accumulation is float32 (float64 for float64 input). Tap indices are not range-checked
        here (that would synchronise the device); out-of-range taps contribute nothing.

    Example::

        >>> i = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32, device="cuda")
        >>> w = torch.full((2, 2), 0.5, device="cuda")
        >>> (y,) = resample3d_chain_triton(torch.ones(1, 1, 4, 4, 4, device="cuda"), [i], [w], [i], [w], [i], [w])
        >>> y.shape
        torch.Size([1, 1, 2, 2, 2])
    """
    if not HAS_TRITON:
        raise ImportError("resample3d_chain_triton needs Triton: `pip install triton` (or msconv[triton]), "
                          "or use another backend (MSCONV_BACKEND=cpp|reference)")
    if x.dim() != 5:
        raise ValueError(f"resample3d_chain: x must be N x C x D x H x W, got {tuple(x.shape)=}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"resample3d_chain: x must be a floating tensor, got {x.dtype=}")
    if not (x.is_cuda or _interpreting()):
        raise ValueError(f"resample3d_chain_triton: x is on {x.device}; Triton needs a CUDA tensor "
                         "(or TRITON_INTERPRET=1 set before importing Triton, for CPU tensors)")
    tables = list(zip(iz, wz, iy, wy, ix, wx))
    if not len(iz) == len(wz) == len(iy) == len(wy) == len(ix) == len(wx):
        raise ValueError("resample3d_chain: iz, wz, iy, wy, ix, wx must have one table per level, got "
                         f"{len(iz)}, {len(wz)}, {len(iy)}, {len(wy)}, {len(ix)}, {len(wx)}")
    for level, t in enumerate(tables):  # all checks before the first launch
        for name, (idx, w) in zip(("iz/wz", "iy/wy", "ix/wx"), (t[0:2], t[2:4], t[4:6])):
            _check_tables(idx, w, name, level, x)
    channels_last = x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous()
    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
    budget = _TILE_INTERPRET if x.device.type == "cpu" else _TILE_GPU

    src = x
    outs: list[torch.Tensor] = []
    # Triton launches on the current device, which need not be x's.
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        for t in tables:
            src = _resample3d_level(src, *t, fmt, budget)
            outs.append(src)
    return outs


def _resample3d_level(
    src: torch.Tensor,  # (N, C, D, H, W) any strides
    iz: torch.Tensor,  # (Do, KZ) int32
    wz: torch.Tensor,  # (Do, KZ) float32
    iy: torch.Tensor,  # (Ho, KY) int32
    wy: torch.Tensor,  # (Ho, KY) float32
    ix: torch.Tensor,  # (Wo, KX) int32
    wx: torch.Tensor,  # (Wo, KX) float32
    fmt: torch.memory_format,
    budget: int,
) -> torch.Tensor:
    iz, wz, iy, wy, ix, wx = (t.contiguous() for t in (iz, wz, iy, wy, ix, wx))
    N, C, D, H, W = src.shape
    Do, Ho, Wo = iz.shape[0], iy.shape[0], ix.shape[0]
    out = torch.empty((N, C, Do, Ho, Wo), dtype=src.dtype, device=src.device, memory_format=fmt)
    if out.numel() == 0:
        return out
    channels_last = fmt == torch.channels_last_3d
    bi, bj, bc = _tile(C, Ho, Wo, channels_last, budget)
    grid = (N * Do * triton.cdiv(C, bc) * triton.cdiv(Ho, bi) * triton.cdiv(Wo, bj),)
    _resample3d_kernel[grid](
        src, out, iz, wz, iy, wy, ix, wx,
        C, D, H, W, Do, Ho, Wo,
        *src.stride(), *out.stride(),
        KZ=iz.shape[1], KY=iy.shape[1], KX=ix.shape[1],
        BLOCK_I=bi, BLOCK_J=bj, BLOCK_C=bc,
        CHANNELS_LAST=channels_last,
        ACC_FP64=src.dtype == torch.float64,
        num_warps=4,
    )  # fmt: skip
    return out
