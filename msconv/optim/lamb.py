"""LAMB: Adam moments with a layer-wise trust ratio (You et al., arXiv 1904.00962).

Per parameter tensor w with gradient g (step t, counted per tensor)::

    m ← β1·m + (1 − β1)·g              v ← β2·v + (1 − β2)·g²
    u = (m / (1 − β1^t)) / (sqrt(v / (1 − β2^t)) + eps) + β·w     (no bias correction: m, v)
    λ = ‖w‖ / ‖u‖, λ = 1 where ‖w‖ = 0 or ‖u‖ = 0 (capped at max_trust_ratio if given;
    norm_floor=ρ > 0 puts max(‖w‖, ρ·‖w_ref‖) in place of ‖w‖, ‖w_ref‖ as in LARS)
    w ← w − γ_t·λ·u

Excluded tensors (``exclude_1d``, ``lars_exclude``) take the plain Adam step γ_t·u without
λ and without weight decay, exactly as LARS excludes them.
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

__all__ = ["LAMB", "lamb"]


def _step_dtype(dtype: torch.dtype) -> torch.dtype:
    # float32 counts exactly to 2^24 steps; float64 parameters get a float64 count so that
    # their bias correction is as exact as the rest of their arithmetic.
    return torch.float64 if dtype == torch.float64 else torch.float32


class LAMB(LayerwiseOptimizer):
    r"""Layer-wise adaptive moments (Adam with a per-tensor trust ratio).

    Args:
        params: parameters or param-group dicts; a group may set ``lars_exclude=True``
            (plain Adam, no trust ratio, no weight decay) and override any argument below.
        lr (float or 0-dim Tensor): γ_t. Default 1e-3. A tensor avoids recompiles of a
            compiled ``step()`` while a scheduler changes it.
        betas (tuple[float, float]): (β1, β2), each in [0, 1). Default (0.9, 0.999).
        eps (float): > 0, added to sqrt(v̂). Default 1e-6 (the paper's value).
        weight_decay (float): β >= 0, decoupled: added to the Adam direction u before λ.
        bias_correction (bool): divide m and v by (1 − β^t). Default True.
        max_trust_ratio (float or None): upper bound on λ (the paper's φ; 1.0 gives timm's
            ``trust_clip``). Default None, no bound.
        exclude_1d (bool): exclude tensors with ``ndim <= 1`` from λ and weight decay.
        norm_floor (float): ρ >= 0; λ's numerator becomes max(‖w‖, ρ·‖w_ref‖), ‖w_ref‖ the
            norm of a He-initialised tensor of that shape (sqrt(2·shape[0])) or, for 1-d
            tensors, sqrt(numel), so a zero-initialised tensor is not stuck near zero (see
            :class:`msconv.optim.LARS`). Default 0, the paper.
        foreach (bool or None): multi-tensor path; ``None`` picks it. Same numbers either way.

    State per tensor: ``step`` (0-dim float tensor on the parameter's device, so bias
    correction never reads back to the host), ``exp_avg`` and ``exp_avg_sq`` (shape of w).

    Example::

        >>> model = torch.nn.Linear(16, 4)
        >>> opt = LAMB(model.parameters(), lr=1e-2, weight_decay=0.01, exclude_1d=True)
        >>> model(torch.randn(8, 16)).square().mean().backward()
        >>> opt.step()
    """

    def __init__(
        self,
        params: Any,
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        bias_correction: bool = True,
        max_trust_ratio: float | None = None,
        exclude_1d: bool = False,
        norm_floor: float = 0.0,
        foreach: bool | None = None,
    ) -> None:
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "bias_correction": bias_correction,
            "max_trust_ratio": max_trust_ratio,
            "exclude_1d": exclude_1d,
            "norm_floor": norm_floor,
            "lars_exclude": False,
            "foreach": foreach,
        }
        super().__init__(params, defaults)

    _owner = "LAMB"
    _added_options = {**LayerwiseOptimizer._added_options, "norm_floor": 0.0}
    @staticmethod
    def _check_group(group: dict[str, Any]) -> None:
        _check_lamb_group(group)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        # torch.optim keeps a loaded "step" where it was saved; move it next to its
        # parameter so step() never mixes devices.
        for p, s in self.state.items():
            if isinstance(p, Tensor) and isinstance(s.get("step"), Tensor):
                s["step"] = s["step"].to(device=p.device, dtype=_step_dtype(p.dtype))

    def _init_group(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        exp_avgs: list[Tensor],
        exp_avg_sqs: list[Tensor],
        state_steps: list[Tensor],
    ) -> bool:
        # Named _init_group so that dynamo runs it eagerly (see LARS._init_group).
        for p in group["params"]:
            if p.grad is None:
                continue
            grad = self._dense_grad(p)
            state = self.state[p]
            if not state:
                state["step"] = torch.zeros((), dtype=_step_dtype(p.dtype), device=p.device)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            params.append(p)
            grads.append(grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            state_steps.append(state["step"])
        return False

    @mark_step_tracked
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one LAMB update. ``closure`` re-evaluates the model and returns the loss."""
        self._record_step_called()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params: list[Tensor] = []
            grads: list[Tensor] = []
            exp_avgs: list[Tensor] = []
            exp_avg_sqs: list[Tensor] = []
            state_steps: list[Tensor] = []
            self._init_group(group, params, grads, exp_avgs, exp_avg_sqs, state_steps)
            if not params:
                continue
            beta1, beta2 = group["betas"]
            lamb(
                params,
                grads,
                exp_avgs,
                exp_avg_sqs,
                state_steps,
                [is_adapted(group, p) for p in params],
                lr=group["lr"],
                beta1=beta1,
                beta2=beta2,
                eps=group["eps"],
                weight_decay=group["weight_decay"],
                bias_correction=group["bias_correction"],
                max_trust_ratio=group["max_trust_ratio"],
                norm_floor=group["norm_floor"],
                foreach=group["foreach"],
            )
        return loss


def _check_lamb_group(group: dict[str, Any]) -> None:
    group["lr"] = check_lr("LAMB", group["lr"])
    betas = group["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"LAMB: betas must be a pair (beta1, beta2), got betas={betas!r}")
    group["betas"] = (
        check_unit_interval("LAMB", "betas[0]", betas[0], "0.9 is the usual value"),
        check_unit_interval("LAMB", "betas[1]", betas[1], "0.999 is the usual value"),
    )
    group["eps"] = check_nonneg("LAMB", "eps", group["eps"])
    if group["eps"] == 0.0:
        raise ValueError(
            "LAMB: eps must be > 0, got eps=0.0 (m/(sqrt(v)+eps) is 0/0 for a tensor whose "
            "gradient has always been 0); use 1e-6"
        )
    group["weight_decay"] = check_nonneg("LAMB", "weight_decay", group["weight_decay"])
    group["norm_floor"] = check_nonneg(
        "LAMB", "norm_floor", group["norm_floor"], "use 0 for the paper's update or 1.0"
    )
    if group["max_trust_ratio"] is not None:
        group["max_trust_ratio"] = check_nonneg(
            "LAMB", "max_trust_ratio", group["max_trust_ratio"]
        )
        if group["max_trust_ratio"] == 0.0:
            raise ValueError(
                "LAMB: max_trust_ratio must be > 0 or None, got max_trust_ratio=0.0 (every "
                "step would be zero); use None for no bound or e.g. 10.0"
            )
    for name in ("bias_correction", "exclude_1d", "lars_exclude"):
        check_bool("LAMB", name, group[name])
    if group["foreach"] is not None:
        check_bool("LAMB", "foreach", group["foreach"])


def lamb(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    adapted: list[bool],
    *,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    bias_correction: bool,
    max_trust_ratio: float | None,
    norm_floor: float = 0.0,
    foreach: bool | None = None,
) -> None:
    """Functional LAMB: update params, moments and 0-dim step counters in place.

    All lists have one entry per parameter; ``adapted[i]`` False means plain Adam for
    ``params[i]``. Keyword arguments as for :class:`LAMB` (already validated).
    """
    n = len(params)
    lengths = (len(grads), len(exp_avgs), len(exp_avg_sqs), len(state_steps), len(adapted))
    if any(k != n for k in lengths):
        raise ValueError(
            "lamb: params, grads, exp_avgs, exp_avg_sqs, state_steps and adapted must have "
            f"equal lengths, got {(n, *lengths)}"
        )
    impl = _multi_tensor_lamb if use_foreach(foreach, params) else _single_tensor_lamb
    impl(
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        state_steps,
        adapted,
        lr=lr,
        beta1=beta1,
        beta2=beta2,
        eps=eps,
        weight_decay=weight_decay,
        bias_correction=bias_correction,
        max_trust_ratio=max_trust_ratio,
        norm_floor=norm_floor,
    )


def _lamb_rate(
    w_norm: Tensor, u_norm: Tensor, lr: float | Tensor, max_trust_ratio: float | None
) -> Tensor:
    lam = trust_ratio(w_norm, u_norm, u_norm, 1.0)
    if max_trust_ratio is not None:
        lam = lam.clamp(max=max_trust_ratio)
    return lam * lr


# Both paths build u in the one temporary a step needs (sqrt(v), then turned into u in
# place: on CPU a fresh allocation costs about ten in-place passes) and issue the same
# operations in the same order, so they agree bitwise.


def _single_tensor_lamb(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    adapted: list[bool],
    *,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    bias_correction: bool,
    max_trust_ratio: float | None,
    norm_floor: float,
) -> None:
    for i, (p, g, m, v, t) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs, state_steps)):
        lr_d = lr.to(p.device) if isinstance(lr, Tensor) else lr
        t.add_(1)
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        u = v.sqrt()
        if bias_correction:
            u.div_((1 - beta2**t).sqrt())
        u.add_(eps).reciprocal_().mul_(m)
        if bias_correction:
            u.div_(1 - beta1**t)
        if adapted[i]:
            if weight_decay != 0:
                u.add_(p, alpha=weight_decay)
            nd = norm_dtype(p.dtype)
            (w_norm,) = floored_norms([torch.linalg.vector_norm(p, dtype=nd)], [p], norm_floor)
            u_norm = torch.linalg.vector_norm(u, dtype=nd)
            p.addcmul_(u, -_lamb_rate(w_norm, u_norm, lr_d, max_trust_ratio))
        elif isinstance(lr_d, Tensor):
            p.addcmul_(u, -lr_d)
        else:
            p.add_(u, alpha=-lr_d)


def _multi_tensor_lamb(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    adapted: list[bool],
    *,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    bias_correction: bool,
    max_trust_ratio: float | None,
    norm_floor: float,
) -> None:
    buckets = group_by_device_and_dtype(list(range(len(params))), params)
    for (device, dtype), idx in buckets.items():
        lr_d = lr.to(device) if isinstance(lr, Tensor) else lr
        # Adapted tensors first, so one slice of the bucket gets λ and the rest does not.
        order = [i for i in idx if adapted[i]] + [i for i in idx if not adapted[i]]
        n_a = sum(1 for i in idx if adapted[i])
        ps = [params[i] for i in order]
        gs = [grads[i] for i in order]
        ms = [exp_avgs[i] for i in order]
        vs = [exp_avg_sqs[i] for i in order]
        ts = [state_steps[i] for i in order]

        torch._foreach_add_(ts, 1)
        torch._foreach_lerp_(ms, gs, 1 - beta1)
        torch._foreach_mul_(vs, beta2)
        torch._foreach_addcmul_(vs, gs, gs, value=1 - beta2)
        us = torch._foreach_sqrt(vs)
        if bias_correction:
            # Steps are per tensor (a tensor whose grad was None skipped a step), so the
            # corrections are too: computed on the stacked counters, on the device.
            steps = torch.stack(ts)
            torch._foreach_div_(us, (1 - beta2**steps).sqrt().unbind(0))
        torch._foreach_add_(us, eps)
        torch._foreach_reciprocal_(us)
        torch._foreach_mul_(us, ms)
        if bias_correction:
            torch._foreach_div_(us, (1 - beta1**steps).unbind(0))

        if n_a:
            us_a, ps_a = us[:n_a], ps[:n_a]
            if weight_decay != 0:
                torch._foreach_add_(us_a, ps_a, alpha=weight_decay)
            nd = norm_dtype(dtype)
            w_norm = torch.stack(floored_norms(torch._foreach_norm(ps_a, 2, dtype=nd), ps_a, norm_floor))
            u_norm = torch.stack(torch._foreach_norm(us_a, 2, dtype=nd))
            rates = _lamb_rate(w_norm, u_norm, lr_d, max_trust_ratio)
            torch._foreach_addcmul_(ps_a, us_a, (-rates).unbind(0))
        if n_a < len(us):
            if isinstance(lr_d, Tensor):
                torch._foreach_addcmul_(ps[n_a:], us[n_a:], [-lr_d] * (len(us) - n_a))
            else:
                torch._foreach_add_(ps[n_a:], us[n_a:], alpha=-lr_d)
