"""The mesh-free convolution jets as a custom op with compiled, CUDA and Triton kernels.

``torch.ops.msconv.mf_jets(xp, filt, order, stride, backend)`` computes exactly
:func:`msconv.reference.mf_jets_ref`: for a pre-padded field ``xp`` (N, C, Hp, Wp) and
correlation filters ``filt`` (order+1, K), the jets (N, C·M, Ho, Wo), ``Ho = (Hp − K)//stride + 1``,
channel ``c·M + m`` holding ``Σ_t Σ_q filt[b,t] filt[a,q] xp[n, c, i·S+t, j·S+q]`` for
``(a, b) = mf_multi_indices(order)[m]``. Importing this module registers the op.

Gradients:

* w.r.t. ``xp``: ``msconv::mf_jets_adjoint``, the transposed strided separable correlation, a
  gather kernel on every backend (no atomics). Its own gradient is ``mf_jets`` again, so
  gradients of any order w.r.t. ``xp`` are kernels.
* w.r.t. ``filt`` (only needed for a learnable σ): plain PyTorch, :func:`_filt_grad` — the
  weight-gradient of the two 1-D passes written as two F.conv2d calls per filter row, which
  autograd differentiates again (double backward through ``filt`` works, at reference speed).

``backend``: ``auto|cpp|cuda|triton|reference`` (see msconv/ops/_backend.py); ``reference`` runs
``mf_jets_ref`` inside the op. The functional :func:`mf_jets` resolves ``None`` from
``MSCONV_BACKEND`` and runs the reference outside the op (plain autograd) like the other ops.

Limits (all backends): ``0 <= order <= MAX_ORDER``, ``1 <= K <= MAX_TAPS``, ``Hp, Wp >= K``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from msconv import reference
from msconv.ops import _backend
from msconv.ops._common import FLOAT_DTYPES, check_image, check_int

__all__ = ["mf_jets", "mf_jets_adjoint", "MAX_ORDER", "MAX_TAPS"]

MAX_ORDER = 8
MAX_TAPS = 256


def _check(xp_shape, filt: torch.Tensor, order: int, stride: int, op: str) -> tuple[int, int]:
    """(Ho, Wo); every error names the argument, the value and the fix."""
    check_int(order, "order", op)
    check_int(stride, "stride", op, minimum=1)
    if order > MAX_ORDER:
        raise ValueError(f"{op}: order must be <= {MAX_ORDER}, got order={order}")
    if not isinstance(filt, torch.Tensor) or filt.dim() != 2 or filt.shape[0] != order + 1:
        shape = tuple(filt.shape) if isinstance(filt, torch.Tensor) else type(filt).__name__
        raise ValueError(f"{op}: filt must be [order + 1, K] = [{order + 1}, K], got filt.shape={shape}")
    if filt.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: filt must be a float tensor, got filt.dtype={filt.dtype}; convert with filt.float()")
    k = filt.shape[1]
    if not 1 <= k <= MAX_TAPS:
        raise ValueError(
            f"{op}: filt has K={k} taps; the kernels support 1 <= K <= {MAX_TAPS} "
            "(so wide a footprint means sigma/scale is large: use a coarser grid or method='fft')"
        )
    hp, wp = xp_shape[-2], xp_shape[-1]
    if hp < k or wp < k:
        raise ValueError(
            f"{op}: the padded input must be at least K x K = {k} x {k}, got xp.shape={tuple(xp_shape)}; "
            "pad by at least K - 1 in total or use a smaller sigma"
        )
    return (hp - k) // stride + 1, (wp - k) // stride + 1


def _run_forward(xp, filt, order, stride, backend):
    if backend in ("cpp", "cuda"):
        return torch.ops.msconv.mf_jets_fwd(xp, filt, order, stride)
    if backend == "triton":
        from msconv.triton.mf_jets import mf_jets_fwd_triton

        return mf_jets_fwd_triton(xp, filt, order, stride)
    if backend == "reference":
        return reference.mf_jets_ref(xp, filt, order, stride).contiguous(
            memory_format=torch.channels_last if _is_cl(xp) else torch.contiguous_format
        )
    raise ValueError(f"mf_jets: backend {backend!r} has no jets kernel")


def _run_adjoint(grad, filt, order, stride, hp, wp, backend):
    if backend in ("cpp", "cuda"):
        return torch.ops.msconv.mf_jets_adj(grad, filt, order, stride, hp, wp)
    if backend == "triton":
        from msconv.triton.mf_jets import mf_jets_adj_triton

        return mf_jets_adj_triton(grad, filt, order, stride, hp, wp)
    if backend == "reference":
        return _adjoint_ref(grad, filt, order, stride, hp, wp)
    raise ValueError(f"mf_jets_adjoint: backend {backend!r} has no jets kernel")


def _is_cl(t: torch.Tensor) -> bool:
    return t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def _adjoint_ref(grad, filt, order, stride, hp, wp):
    """The adjoint by autograd through mf_jets_ref (plain PyTorch)."""
    n, cm = grad.shape[:2]
    c = cm // ((order + 1) * (order + 2) // 2)
    x = torch.zeros(n, c, hp, wp, dtype=grad.dtype, device=grad.device, requires_grad=True)
    with torch.enable_grad():
        (g,) = torch.autograd.grad(reference.mf_jets_ref(x, filt.detach(), order, stride), x, grad)
    return g.contiguous(memory_format=torch.channels_last if _is_cl(grad) else torch.contiguous_format)


def _resolve(backend: str, device: torch.device) -> str:
    return _backend.resolve("mf_jets", device, backend)


@torch.library.custom_op("msconv::mf_jets", mutates_args=())
def _mf_jets(xp: torch.Tensor, filt: torch.Tensor, order: int, stride: int, backend: str) -> torch.Tensor:
    check_image(xp, "xp", "mf_jets")
    _check(xp.shape, filt, order, stride, "mf_jets")
    if filt.device != xp.device:
        raise ValueError(f"mf_jets: filt is on {filt.device} but xp is on {xp.device}; move filt to xp.device")
    return _run_forward(xp, filt, order, stride, _resolve(backend, xp.device))


@_mf_jets.register_fake
def _(xp, filt, order, stride, backend):
    ho, wo = _check(xp.shape, filt, order, stride, "mf_jets")
    m = (order + 1) * (order + 2) // 2
    return xp.new_empty((xp.shape[0], xp.shape[1] * m, ho, wo)).contiguous(
        memory_format=torch.channels_last if _is_cl(xp) else torch.contiguous_format
    )


@torch.library.custom_op("msconv::mf_jets_adjoint", mutates_args=())
def _mf_jets_adjoint(
    grad: torch.Tensor, filt: torch.Tensor, order: int, stride: int, hp: int, wp: int, backend: str
) -> torch.Tensor:
    check_image(grad, "grad", "mf_jets_adjoint")
    _check((hp, wp), filt, order, stride, "mf_jets_adjoint")
    return _run_adjoint(grad, filt, order, stride, hp, wp, _resolve(backend, grad.device))


@_mf_jets_adjoint.register_fake
def _(grad, filt, order, stride, hp, wp, backend):
    m = (order + 1) * (order + 2) // 2
    out = grad.new_empty((grad.shape[0], grad.shape[1] // m, hp, wp))
    return out.contiguous(memory_format=torch.channels_last if _is_cl(grad) else torch.contiguous_format)


def _filt_grad(xp: torch.Tensor, filt: torch.Tensor, grad: torch.Tensor, order: int, stride: int) -> torch.Tensor:
    """d<grad, mf_jets(xp, filt)>/d filt in plain PyTorch (differentiable in all three inputs).

    Jet (a, b) is the row pass ``H_a`` (taps ``filt[a]`` along W) followed by the column pass
    ``filt[b]`` along H, or the other way round, so
    ``dfilt[b, t] = Σ G_ab[i, j] · H_a[i·S + t, j]`` and ``dfilt[a, q] = Σ G_ab[i, j] · V_b[i, j·S + q]``.
    Each sum over (n, c, i, j) is an einsum over the strided windows (``Tensor.unfold``).
    """
    n, c, hp, wp = xp.shape
    p1, k = filt.shape
    idx = reference.mf_multi_indices(order)
    ct = torch.float64 if torch.float64 in (xp.dtype, filt.dtype, grad.dtype) else torch.float32
    if xp.numel() == 0 or grad.numel() == 0:
        return filt * 0
    x = xp.to(ct).reshape(n * c, 1, hp, wp)
    f = filt.to(ct)
    ho, wo = grad.shape[-2:]
    g = grad.to(ct).reshape(n * c, len(idx), ho, wo)
    s = stride
    # V_b: column pass only (N·C, Ho, Wp); H_a: row pass only (N·C, Hp, Wo).
    v = F.conv2d(x, f.reshape(p1, 1, k, 1), stride=(s, 1))
    h = F.conv2d(x, f.reshape(p1, 1, 1, k), stride=(1, s))
    rows = [f.new_zeros(k) for _ in range(p1)]
    for mi, (a, b) in enumerate(idx):
        gm = g[:, mi]
        # unfold gives the (i, j, tap) windows as a view: [N·C, Ho, Wo, K]
        rows[a] = rows[a] + torch.einsum("nij,nijq->q", gm, v[:, b].unfold(2, k, s))
        rows[b] = rows[b] + torch.einsum("nij,nijt->t", gm, h[:, a].unfold(1, k, s))
    return torch.stack(rows).to(filt.dtype)


def _jets_setup(ctx, inputs, output):
    xp, filt, order, stride, backend = inputs
    ctx.save_for_backward(xp, filt)
    ctx.args = (order, stride, xp.shape[2], xp.shape[3], backend)


def _jets_backward(ctx, grad):
    xp, filt = ctx.saved_tensors
    order, stride, hp, wp, backend = ctx.args
    gx = gf = None
    if ctx.needs_input_grad[0]:
        gx = _mf_jets_adjoint(grad.contiguous() if grad.stride(-1) == 0 else grad, filt, order, stride, hp, wp, backend)
    if ctx.needs_input_grad[1]:
        gf = _filt_grad(xp, filt, grad, order, stride)
    return gx, gf, None, None, None


_mf_jets.register_autograd(_jets_backward, setup_context=_jets_setup)


def _adjoint_setup(ctx, inputs, output):
    grad, filt, order, stride, hp, wp, backend = inputs
    ctx.save_for_backward(grad, filt)
    ctx.args = (order, stride, backend)


def _adjoint_backward(ctx, gg):
    # <gg, A(f)^T g> = <A(f) gg, g>: the adjoint's gradient is the forward op.
    grad, filt = ctx.saved_tensors
    order, stride, backend = ctx.args
    dg = df = None
    if ctx.needs_input_grad[0]:
        dg = _mf_jets(gg.contiguous() if gg.stride(-1) == 0 else gg, filt, order, stride, backend)
    if ctx.needs_input_grad[1]:
        df = _filt_grad(gg, filt, grad, order, stride)
    return dg, df, None, None, None, None, None


_mf_jets_adjoint.register_autograd(_adjoint_backward, setup_context=_adjoint_setup)


def mf_jets(
    xp: torch.Tensor, filt: torch.Tensor, order: int, stride: int = 1, *, backend: str | None = None
) -> torch.Tensor:
    """Jets of a pre-padded field: ``mf_jets_ref(xp, filt, order, stride)`` on the chosen backend.

    Args:
        xp: (N, C, Hp, Wp) float16/bfloat16/float32/float64, already padded; any strides.
        filt: (order + 1, K) correlation filters (``mf_taps(...)[0].flip(-1)``), any float dtype;
            used in the accumulation precision (float32, float64 for float64 ``xp``).
        order: highest derivative order p (M = (p+1)(p+2)/2 jets per channel).
        stride: output stride S.
        backend: ``auto|cpp|cuda|triton|reference``; ``None`` reads ``MSCONV_BACKEND``.

    Returns:
        (N, C·M, (Hp − K)//S + 1, (Wp − K)//S + 1) in ``xp.dtype``; channels_last when ``xp`` is.

    >>> from msconv.reference import mf_taps
    >>> taps, _ = mf_taps(2, 1.0, 1.0)
    >>> mf_jets(torch.randn(1, 3, 20, 20), taps.flip(-1).float(), 2).shape
    torch.Size([1, 18, 10, 10])
    """
    check_image(xp, "xp", "mf_jets")
    _check(xp.shape, filt, order, stride, "mf_jets")
    b = _backend.resolve("mf_jets", xp.device, backend)
    if b == "reference":
        return reference.mf_jets_ref(xp, filt, order, stride)
    return _mf_jets(xp, filt, order, stride, b)


def mf_jets_adjoint(
    grad: torch.Tensor, filt: torch.Tensor, order: int, stride: int, hp: int, wp: int, *, backend: str | None = None
) -> torch.Tensor:
    """The transpose of :func:`mf_jets` in ``xp``: (N, C·M, Ho, Wo) -> (N, C, hp, wp)."""
    check_image(grad, "grad", "mf_jets_adjoint")
    _check((hp, wp), filt, order, stride, "mf_jets_adjoint")
    b = _backend.resolve("mf_jets", grad.device, backend)
    return _mf_jets_adjoint(grad, filt, order, stride, hp, wp, b)
