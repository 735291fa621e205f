"""LARS: layer-wise adaptive rate scaling (You, Gitman, Ginsburg, arXiv 1708.03888).

Per parameter tensor w with gradient g, weight decay β, trust coefficient η,
momentum m and global learning rate γ_t::

    λ = η‖w‖ / (‖g‖ + β‖w‖ + eps)          denominator="paper"
    λ = η‖w‖ / (‖g + βw‖ + eps)            denominator="combined" (SimCLR/BYOL/optax form)
    λ = 1 where ‖w‖ = 0 or ‖g‖ = 0
    (norm_floor=ρ > 0: ‖w‖ in the numerator is max(‖w‖, ρ·‖w_ref‖), ‖w_ref‖ the norm of a
     He-initialised tensor of that shape, sqrt(2·shape[0]), or sqrt(numel) for 1-d tensors;
     a zero-initialised tensor then gets λ = ηρ‖w_ref‖/‖g‖ instead of 1)
    r = γ_t·λ                              (trust_clip=True: r = min(γ_t, λ), apex LARC "clip")
    v ← m·v + r·(g + βw)
    w ← w − v                              (nesterov=True: w ← w − (r·(g + βw) + m·v))

The rate sits inside the momentum buffer, as in the paper's Algorithm 1, so a change of
γ_t does not rescale momentum that was accumulated at the old rate.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from ._common import (
    LayerwiseOptimizer,
    check_bool,
    check_lr,
    check_nonneg,
    check_unit_interval,
    floored_norms,
    group_by_device_and_dtype,
    is_adapted,
    mark_step_tracked,
    norm_dtype,
    trust_ratio,
    use_foreach,
)

__all__ = ["LARS", "lars"]

_DENOMINATORS = ("paper", "combined")


class LARS(LayerwiseOptimizer):
    r"""Layer-wise Adaptive Rate Scaling, a drop-in ``torch.optim.Optimizer``.

    Each parameter tensor gets its own rate γ_t·λ with the trust ratio
    λ = η‖w‖ / (‖g‖ + β‖w‖ + eps) (``denominator="paper"``) or η‖w‖ / (‖g + βw‖ + eps)
    (``"combined"``), λ = 1 where ‖w‖ or ‖g‖ is 0; then
    ``v ← m·v + γ_t·λ·(g + βw)``, ``w ← w − v``.

    Args:
        params: parameters or param-group dicts. A group may set ``lars_exclude=True`` to
            train its tensors with plain momentum SGD (no trust ratio, no weight decay), and
            may override any argument below.
        lr (float or 0-dim Tensor): global rate γ_t. A tensor lets ``torch.compile(opt.step)``
            follow a schedule without recompiling; schedulers update it in place.
        momentum (float): m in [0, 1). Default 0.9.
        weight_decay (float): β >= 0, applied as ``g + βw`` before the momentum step.
        trust_coefficient (float): η > 0. Default 1e-3 (the paper's value).
        eps (float): added to the denominator of λ. Default 0, as in the paper.
        nesterov (bool): Nesterov momentum (needs momentum > 0).
        trust_clip (bool): LARC clip mode, rate ``min(γ_t, λ)`` instead of ``γ_t·λ``; λ then
            caps the global rate rather than scaling it.
        denominator (str): ``"paper"`` or ``"combined"``.
        exclude_1d (bool): exclude tensors with ``ndim <= 1`` (biases, norm scales) from the
            trust ratio and weight decay.
        norm_floor (float): ρ >= 0. The ‖w‖ in λ's numerator becomes max(‖w‖, ρ·‖w_ref‖):
            for weights (``ndim >= 2``) ‖w_ref‖ = sqrt(2·numel/fan_in) = sqrt(2·shape[0]), the
            expected norm of a He-initialised tensor of that shape; for biases and norm scales
            sqrt(numel), unit RMS. Default 0: the paper, where a zero-initialised tensor (the
            last conv of a residual model, every bias) takes one raw γ·g step and then moves by
            η times its tiny norm, so it stays near zero. With ρ > 0 it moves from the start
            as fast, relatively, as a freshly initialised one, and the floor stops mattering
            once ‖w‖ exceeds it. Recommended with ``exclude_1d=False``: an excluded bias takes
            raw γ·g steps, too large at the γ that suits the weights (measured on a DnCNN:
            γ = 3 diverges with biases excluded and is the best rate with them adapted;
            ``bench/paper_large_batch.py``).
        foreach (bool or None): multi-tensor ``torch._foreach_*`` path; ``None`` picks it
            (see ``bench/bench_lars.py``). Both paths give the same numbers.

    ``step()`` does not modify ``.grad``, never synchronises with the host and compiles with
    ``torch.compile(opt.step, fullgraph=True)``.

    Example::

        >>> model = torch.nn.Conv2d(3, 8, 3)
        >>> opt = LARS(model.parameters(), lr=torch.tensor(0.1), weight_decay=5e-4,
        ...            exclude_1d=True)
        >>> model(torch.randn(4, 3, 16, 16)).square().mean().backward()
        >>> opt.step()
    """

    def __init__(
        self,
        params: Any,
        lr: float | Tensor,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        trust_coefficient: float = 1e-3,
        eps: float = 0.0,
        nesterov: bool = False,
        trust_clip: bool = False,
        denominator: str = "paper",
        exclude_1d: bool = False,
        norm_floor: float = 0.0,
        foreach: bool | None = None,
    ) -> None:
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "trust_coefficient": trust_coefficient,
            "eps": eps,
            "nesterov": nesterov,
            "trust_clip": trust_clip,
            "denominator": denominator,
            "exclude_1d": exclude_1d,
            "norm_floor": norm_floor,
            "lars_exclude": False,
            "foreach": foreach,
        }
        super().__init__(params, defaults)

    _owner = "LARS"
    _added_options = {**LayerwiseOptimizer._added_options, "norm_floor": 0.0}

    @staticmethod
    def _check_group(group: dict[str, Any]) -> None:
        _check_lars_group(group)

    def _init_group(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        momentum_buffers: list[Tensor],
    ) -> bool:
        # Named _init_group on purpose: dynamo runs a method of this name eagerly instead of
        # tracing it, so lazily created state does not force a second compilation.
        for p in group["params"]:
            if p.grad is None:
                continue
            params.append(p)
            grads.append(self._dense_grad(p))
            if group["momentum"] != 0:
                state = self.state[p]
                if "momentum_buffer" not in state:
                    # v = 0 before the first step, as in the paper (not v = g as in SGD).
                    state["momentum_buffer"] = torch.zeros_like(
                        p, memory_format=torch.preserve_format
                    )
                momentum_buffers.append(state["momentum_buffer"])
        return False

    @mark_step_tracked
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one LARS update. ``closure`` re-evaluates the model and returns the loss."""
        self._record_step_called()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params: list[Tensor] = []
            grads: list[Tensor] = []
            momentum_buffers: list[Tensor] = []
            self._init_group(group, params, grads, momentum_buffers)
            if not params:
                continue
            lars(
                params,
                grads,
                momentum_buffers,
                [is_adapted(group, p) for p in params],
                lr=group["lr"],
                momentum=group["momentum"],
                weight_decay=group["weight_decay"],
                trust_coefficient=group["trust_coefficient"],
                eps=group["eps"],
                nesterov=group["nesterov"],
                trust_clip=group["trust_clip"],
                denominator=group["denominator"],
                norm_floor=group["norm_floor"],
                foreach=group["foreach"],
            )
        return loss


def _check_lars_group(group: dict[str, Any]) -> None:
    """Validate (and normalise in place) one group's hyperparameters."""
    group["lr"] = check_lr("LARS", group["lr"])
    group["momentum"] = check_unit_interval(
        "LARS", "momentum", group["momentum"], "0.9 is the paper's value"
    )
    group["weight_decay"] = check_nonneg("LARS", "weight_decay", group["weight_decay"])
    group["eps"] = check_nonneg("LARS", "eps", group["eps"])
    group["trust_coefficient"] = check_nonneg(
        "LARS", "trust_coefficient", group["trust_coefficient"]
    )
    group["norm_floor"] = check_nonneg(
        "LARS", "norm_floor", group["norm_floor"], "use 0 for the paper's update or 1.0"
    )
    if group["trust_coefficient"] == 0.0:
        raise ValueError(
            "LARS: trust_coefficient must be > 0, got trust_coefficient=0.0 (every step would "
            "be zero); the paper uses 1e-3"
        )
    for name in ("nesterov", "trust_clip", "exclude_1d", "lars_exclude"):
        check_bool("LARS", name, group[name])
    if group["nesterov"] and group["momentum"] == 0:
        raise ValueError(
            "LARS: nesterov=True needs momentum > 0, got momentum=0.0; set momentum (e.g. 0.9) "
            "or nesterov=False"
        )
    if group["denominator"] not in _DENOMINATORS:
        raise ValueError(
            f"LARS: unknown denominator={group['denominator']!r}; use 'paper' "
            "(‖g‖ + β‖w‖) or 'combined' (‖g + βw‖)"
        )
    if group["foreach"] is not None:
        check_bool("LARS", "foreach", group["foreach"])


def lars(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor],
    adapted: list[bool],
    *,
    lr: float | Tensor,
    momentum: float,
    weight_decay: float,
    trust_coefficient: float,
    eps: float,
    nesterov: bool,
    trust_clip: bool,
    denominator: str,
    norm_floor: float = 0.0,
    foreach: bool | None = None,
) -> None:
    """Functional LARS: update ``params`` and ``momentum_buffers`` in place.

    Args:
        params, grads: equal-length lists; ``grads[i]`` has ``params[i]``'s shape.
        momentum_buffers: one buffer per parameter (zeros before the first step), or an
            empty list when ``momentum == 0``.
        adapted: per parameter, True for the trust ratio and weight decay, False for plain
            momentum SGD.
        The keyword arguments are those of :class:`LARS` (already validated).
    """
    if not (len(params) == len(grads) == len(adapted)):
        raise ValueError(
            f"lars: params, grads and adapted must have equal lengths, got "
            f"{len(params)=}, {len(grads)=}, {len(adapted)=}"
        )
    if momentum != 0 and len(momentum_buffers) != len(params):
        raise ValueError(
            f"lars: momentum={momentum} needs one buffer per parameter, got "
            f"{len(momentum_buffers)=} for {len(params)=}"
        )
    impl = _multi_tensor_lars if use_foreach(foreach, params) else _single_tensor_lars
    impl(
        params,
        grads,
        momentum_buffers,
        adapted,
        lr=lr,
        momentum=momentum,
        weight_decay=weight_decay,
        trust_coefficient=trust_coefficient,
        eps=eps,
        nesterov=nesterov,
        trust_clip=trust_clip,
        denominator=denominator,
        norm_floor=norm_floor,
    )


def _rate(lam: Tensor, lr: float | Tensor, trust_clip: bool) -> Tensor:
    if trust_clip:
        return torch.minimum(lam, lr) if isinstance(lr, Tensor) else lam.clamp(max=lr)
    return lam * lr


# How both paths apply v ← m·v + r·(g + βw), w ← w − v without a temporary for g + βw:
# on CPU a freshly allocated tensor costs about ten times an in-place pass over it (page
# faults), so the decay term goes straight into the buffer (or the weights) as r·β·w.
# The single-tensor and multi-tensor paths issue the same operations in the same order,
# which makes them agree bitwise.


def _single_tensor_lars(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor],
    adapted: list[bool],
    *,
    lr: float | Tensor,
    momentum: float,
    weight_decay: float,
    trust_coefficient: float,
    eps: float,
    nesterov: bool,
    trust_clip: bool,
    denominator: str,
    norm_floor: float,
) -> None:
    direct = nesterov or momentum == 0  # the current gradient enters w directly
    for i, (p, g) in enumerate(zip(params, grads)):
        lr_d = lr.to(p.device) if isinstance(lr, Tensor) else lr
        buf = momentum_buffers[i] if momentum != 0 else None
        if buf is not None:
            buf.mul_(momentum)
        if adapted[i]:
            nd = norm_dtype(p.dtype)
            w_norm = torch.linalg.vector_norm(p, dtype=nd)
            g_norm = torch.linalg.vector_norm(g, dtype=nd)
            d = None
            if denominator == "paper":
                denom = g_norm + weight_decay * w_norm
            elif weight_decay != 0:
                d = g.add(p, alpha=weight_decay)
                denom = torch.linalg.vector_norm(d, dtype=nd)
            else:
                denom = g_norm
            (w_ref,) = floored_norms([w_norm], [p], norm_floor)
            lam = trust_ratio(w_ref, g_norm, denom + eps, trust_coefficient)
            r = _rate(lam, lr_d, trust_clip)
            # d is None: the decay enters as a separate r·β·w term (no temporary).
            step_dir, decay = (g, weight_decay != 0) if d is None else (d, False)
            rb = r * weight_decay
            if buf is not None:
                buf.addcmul_(step_dir, r)
                if decay:
                    buf.addcmul_(p, rb)
            if direct:
                if decay:
                    p.addcmul_(p, -rb)
                p.addcmul_(step_dir, -r)
        else:
            if buf is not None:
                if isinstance(lr_d, Tensor):
                    buf.addcmul_(g, lr_d)
                else:
                    buf.add_(g, alpha=lr_d)
            if direct:
                if isinstance(lr_d, Tensor):
                    p.addcmul_(g, -lr_d)
                else:
                    p.add_(g, alpha=-lr_d)
        if buf is not None:
            if nesterov:
                p.add_(buf, alpha=-momentum)
            else:
                p.sub_(buf)


def _multi_tensor_lars(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor],
    adapted: list[bool],
    *,
    lr: float | Tensor,
    momentum: float,
    weight_decay: float,
    trust_coefficient: float,
    eps: float,
    nesterov: bool,
    trust_clip: bool,
    denominator: str,
    norm_floor: float,
) -> None:
    direct = nesterov or momentum == 0
    buckets = group_by_device_and_dtype(list(range(len(params))), params)
    for (device, dtype), idx in buckets.items():
        lr_d = lr.to(device) if isinstance(lr, Tensor) else lr
        ia = [i for i in idx if adapted[i]]
        ie = [i for i in idx if not adapted[i]]
        ps_a, gs_a = [params[i] for i in ia], [grads[i] for i in ia]
        ps_e, gs_e = [params[i] for i in ie], [grads[i] for i in ie]
        bufs_a = [momentum_buffers[i] for i in ia] if momentum != 0 else []
        bufs_e = [momentum_buffers[i] for i in ie] if momentum != 0 else []
        if momentum != 0:
            torch._foreach_mul_(bufs_a + bufs_e, momentum)
        if ia:
            nd = norm_dtype(dtype)
            w_norms = torch._foreach_norm(ps_a, 2, dtype=nd)
            w_norm = torch.stack(w_norms)
            w_ref = torch.stack(floored_norms(w_norms, ps_a, norm_floor))
            g_norm = torch.stack(torch._foreach_norm(gs_a, 2, dtype=nd))
            ds = None
            if denominator == "paper":
                denom = g_norm + weight_decay * w_norm
            elif weight_decay != 0:
                # The one temporary of the step: ‖g + βw‖ has no in-place form. The update
                # then uses the same d, so the direction is exactly the one normalised.
                ds = torch._foreach_add(gs_a, ps_a, alpha=weight_decay)
                denom = torch.stack(torch._foreach_norm(ds, 2, dtype=nd))
            else:
                denom = g_norm
            lam = trust_ratio(w_ref, g_norm, denom + eps, trust_coefficient)
            r = _rate(lam, lr_d, trust_clip)
            step_dir, decay = (gs_a, weight_decay != 0) if ds is None else (ds, False)
            rb = r * weight_decay
            if momentum != 0:
                torch._foreach_addcmul_(bufs_a, step_dir, r.unbind(0))
                if decay:
                    torch._foreach_addcmul_(bufs_a, ps_a, rb.unbind(0))
            if direct:
                if decay:
                    torch._foreach_addcmul_(ps_a, ps_a, (-rb).unbind(0))
                torch._foreach_addcmul_(ps_a, step_dir, (-r).unbind(0))
        if ie:
            if momentum != 0:
                if isinstance(lr_d, Tensor):
                    torch._foreach_addcmul_(bufs_e, gs_e, [lr_d] * len(ie))
                else:
                    torch._foreach_add_(bufs_e, gs_e, alpha=lr_d)
            if direct:
                if isinstance(lr_d, Tensor):
                    torch._foreach_addcmul_(ps_e, gs_e, [-lr_d] * len(ie))
                else:
                    torch._foreach_add_(ps_e, gs_e, alpha=-lr_d)
        if momentum != 0:
            if nesterov:
                torch._foreach_add_(ps_a + ps_e, bufs_a + bufs_e, alpha=-momentum)
            else:
                torch._foreach_sub_(ps_a + ps_e, bufs_a + bufs_e)
