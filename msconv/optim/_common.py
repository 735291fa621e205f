"""Pieces shared by LARS and LAMB: argument checks, exclusion rules, the trust ratio.

Nothing here reads a tensor value back to the host: `step()` must be capturable by
`torch.compile(fullgraph=True)` and by CUDA graphs, so every data-dependent choice is a
`torch.where` and every Python `if` looks only at hyperparameters, shapes and dtypes.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

__all__ = [
    "LayerwiseOptimizer",
    "check_lr",
    "check_nonneg",
    "check_unit_interval",
    "floored_norms",
    "reference_norm",
    "is_adapted",
    "group_by_device_and_dtype",
    "norm_dtype",
    "trust_ratio",
    "use_foreach",
]


def check_lr(owner: str, lr: Any) -> Any:
    """Validate a learning rate (float or 1-element floating tensor); return it 0-dim.

    A tensor lr is what lets `torch.compile(opt.step)` follow a schedule without
    recompiling: a float is baked into the graph as a constant, a tensor is an input.
    """
    if isinstance(lr, Tensor):
        if lr.numel() != 1 or not lr.is_floating_point():
            raise ValueError(
                f"{owner}: a tensor lr must hold exactly one floating-point value, got "
                f"{lr.shape=} {lr.dtype=}; pass e.g. torch.tensor(0.1)"
            )
        if lr.requires_grad:
            raise ValueError(
                f"{owner}: lr must not require grad (got lr.requires_grad=True); "
                "pass lr.detach()"
            )
        # .view keeps the storage, so a scheduler's fill_ on either object is seen by both.
        lr = lr.view(())
        value = float(lr)  # once, at construction; step() never does this
    else:
        if isinstance(lr, bool) or not isinstance(lr, (int, float)):
            raise TypeError(
                f"{owner}: lr must be a float or a 1-element tensor, got "
                f"{type(lr).__name__} {lr!r}"
            )
        value = float(lr)
    if not math.isfinite(value) or value < 0.0:
        raise ValueError(
            f"{owner}: lr must be a finite number >= 0, got lr={value}; "
            "pass a non-negative learning rate"
        )
    return lr


def check_nonneg(owner: str, name: str, value: Any, fix: str = "") -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{owner}: {name} must be a float, got {type(value).__name__} {value!r}")
    if not math.isfinite(value) or value < 0.0:
        raise ValueError(
            f"{owner}: {name} must be a finite number >= 0, got {name}={value}"
            + (f"; {fix}" if fix else "")
        )
    return float(value)


def check_unit_interval(owner: str, name: str, value: Any, fix: str = "") -> float:
    """Check 0 <= value < 1 (momentum and Adam betas: 1 would never forget, >1 diverges)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{owner}: {name} must be a float, got {type(value).__name__} {value!r}")
    if not (0.0 <= value < 1.0):
        raise ValueError(
            f"{owner}: {name} must lie in [0, 1), got {name}={value}"
            + (f"; {fix}" if fix else "")
        )
    return float(value)


def check_bool(owner: str, name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(
            f"{owner}: {name} must be True or False, got {type(value).__name__} {value!r}"
        )
    return value


def check_params(owner: str, group: dict[str, Any]) -> None:
    for i, p in enumerate(group["params"]):
        if not isinstance(p, Tensor) or not p.is_floating_point():
            what = p.dtype if isinstance(p, Tensor) else type(p).__name__
            raise TypeError(
                f"{owner}: parameter {i} of a param group is {what}; only real floating-point "
                "tensors can be optimised (view complex parameters with torch.view_as_real)"
            )


def is_adapted(group: dict[str, Any], p: Tensor) -> bool:
    """True if `p` gets the layer-wise trust ratio and weight decay.

    Biases and normalisation scales (ndim <= 1) are commonly excluded: their norms say
    little about a sensible step, and decaying them hurts (Goyal et al.; You et al. 2019).
    """
    if group["lars_exclude"]:
        return False
    return not (group["exclude_1d"] and p.ndim <= 1)


def use_foreach(foreach: bool | None, params: list[Tensor]) -> bool:
    """Resolve foreach=None: the multi-tensor path, unless running under TorchScript.

    On CUDA the _foreach kernels are batched launches; on CPU they save the Python
    overhead of a per-tensor loop (bench/bench_lars.py measures both), so the default
    is foreach everywhere.
    """
    if foreach is not None:
        return foreach
    return not torch.jit.is_scripting()


def group_by_device_and_dtype(
    indices: list[int], params: list[Tensor]
) -> dict[tuple[torch.device, torch.dtype], list[int]]:
    """Bucket indices so every _foreach call and every torch.stack sees one device and dtype.

    Plain Python on static attributes, so dynamo traces it (the C++ helper that
    torch.optim uses is skipped under compile and would hand us mixed buckets).
    """
    buckets: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i in indices:
        p = params[i]
        buckets.setdefault((p.device, p.dtype), []).append(i)
    return buckets


def norm_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulate norms of half/bfloat16 tensors in float32: a 16-bit sum of squares
    overflows (fp16) or loses the ratio's precision (bf16) for tensors of realistic size."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def reference_norm(p: Tensor) -> float:
    """The reference norm of a tensor of ``p``'s shape, a Python float that depends only on it.

    ndim >= 2 (conv and linear weights): the expected norm of a He-initialised tensor,
    sqrt(2·numel/fan_in) with fan_in = numel / shape[0], i.e. sqrt(2·shape[0]).
    ndim <= 1 (biases, normalisation scales): sqrt(numel), unit RMS per element: the size of a
    normalisation scale at its initialisation (ones), and of the unit-variance activations a
    bias is added to in a He-initialised network.
    Known at construction, so a compiled step bakes it in as a constant.
    """
    if p.ndim >= 2:
        return math.sqrt(2.0 * p.shape[0])
    return math.sqrt(p.numel())


def floored_norms(w_norms: list[Tensor], params: list[Tensor], norm_floor: float) -> list[Tensor]:
    """max(‖w‖, norm_floor·reference_norm(w)) per tensor; the norms themselves when norm_floor is 0.

    Why a floor: a zero-initialised layer (the last conv of a residual model) has ‖w‖ = 0.
    The paper then falls back to λ = 1, a raw γ·g step, and from the next step on moves the
    layer by η‖w‖ with a tiny ‖w‖, so it stays near zero and the model near the identity.
    Against the floor the layer moves from the start as fast, relatively, as a freshly
    initialised layer of its shape, and the floor stops mattering once ‖w‖ exceeds it.
    """
    if norm_floor == 0.0:
        return w_norms
    return torch._foreach_maximum(w_norms, [norm_floor * reference_norm(p) for p in params])


def trust_ratio(
    w_norm: Tensor, u_norm: Tensor, denom: Tensor, trust_coefficient: float
) -> Tensor:
    """λ = η‖w‖/denom, and 1 wherever ‖w‖, ‖u‖ or the denominator is 0.

    Shapes: all inputs broadcastable (a 0-dim tensor per parameter, or a stacked [n]).
    The division is computed everywhere and then discarded where undefined; `where`
    rather than `if` keeps the decision on the device.
    """
    ok = (w_norm > 0) & (u_norm > 0) & (denom > 0)
    return torch.where(ok, trust_coefficient * w_norm / denom, 1.0)


def own_lr(param_groups: list[dict[str, Any]]) -> None:
    """Give the newest group its own lr tensor if it shares one with an earlier group.

    Groups that take the default lr all receive the same tensor object; schedulers write
    each group's lr in place with fill_, so shared storage would let the last write win.
    """
    lr = param_groups[-1]["lr"]
    if not isinstance(lr, Tensor):
        return
    for group in param_groups[:-1]:
        other = group["lr"]
        if isinstance(other, Tensor) and other.data_ptr() == lr.data_ptr():
            param_groups[-1]["lr"] = lr.clone()
            return



class SchedulerFriendlyStep:
    """Mixin that lets `torch.compile(opt.step, fullgraph=True)` work with an LR scheduler.

    An LRScheduler replaces `opt.step` with a wrapper that records the call (for its
    "scheduler.step() before optimizer.step()" warning). That wrapper lives in a file dynamo
    refuses to trace, so a fullgraph compile of the wrapped step fails. Schedulers skip
    the wrapping when the step already carries `_wrapped_by_lr_sched` (set by
    `mark_step_tracked`); `step()` then records the call itself. It writes into a list
    because dynamo replays mutations of containers after a compiled call but drops plain
    attribute stores on optimizers.
    """

    def _init_step_tracker(self) -> None:
        self.__dict__.setdefault("_step_tracker", [False])

    @property
    def _opt_called(self) -> bool:
        return self.__dict__.get("_step_tracker", [False])[0]

    @_opt_called.setter
    def _opt_called(self, value: bool) -> None:
        self._init_step_tracker()
        self._step_tracker[0] = bool(value)

    def _record_step_called(self) -> None:
        self._step_tracker[0] = True


def mark_step_tracked(step_fn: Any) -> Any:
    """Tell LR schedulers that `step_fn` records its own calls (see SchedulerFriendlyStep)."""
    step_fn._wrapped_by_lr_sched = True
    return step_fn


class LayerwiseOptimizer(SchedulerFriendlyStep, Optimizer):
    """What LARS and LAMB share: hyperparameter checks on every group, a per-group lr
    tensor, the exclusion flag, dense-gradient collection, and state_dict compatibility.

    Subclasses set ``_owner`` (the name in error messages) and implement ``_check_group``
    (validate and normalise one group dict in place) and ``step``.
    """

    _owner = "optimizer"

    def __init__(self, params: Any, defaults: dict[str, Any]) -> None:
        self._check_group(defaults)
        self._init_step_tracker()
        super().__init__(params, defaults)

    @staticmethod
    def _check_group(group: dict[str, Any]) -> None:
        raise NotImplementedError

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        self._check_group(group)
        check_params(self._owner, group)
        own_lr(self.param_groups)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._init_step_tracker()
        for group in self.param_groups:
            for key, value in self._added_options.items():
                group.setdefault(key, value)

    # Options added after the first release: a state_dict saved before them loads with
    # these values, which reproduce the old behaviour.
    _added_options: dict[str, Any] = {"lars_exclude": False, "foreach": None}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load as ``torch.optim.Optimizer.load_state_dict`` after checking every saved group.

        The saved groups replace the constructor's hyperparameters, so they pass the same
        checks with the same messages: a negative lr or a NaN momentum would otherwise be
        accepted here and ruin the weights at the next step.
        """
        groups = state_dict.get("param_groups") if isinstance(state_dict, dict) else None
        if not isinstance(groups, list):
            raise ValueError(
                f"{self._owner}.load_state_dict: expected a dict with a 'param_groups' list "
                f"(what {self._owner}.state_dict() returns), got {type(state_dict).__name__}"
            )
        for group in groups:
            missing = sorted(k for k in self.defaults if k not in group and k not in self._added_options) \
                if isinstance(group, dict) else ["(not a dict)"]
            if missing:
                raise ValueError(f"{self._owner}.load_state_dict: the state is another optimizer's: its param_groups "
                                 f"lack {missing}, which {self._owner}.state_dict() holds; load a state saved by "
                                 f"{self._owner} (a new {self._owner} starts without one)")
            # A shallow copy: the checks normalise in place and must not edit the caller's dict.
            self._check_group({**self._added_options, **group})
        super().load_state_dict(state_dict)

    def _dense_grad(self, p: Tensor) -> Tensor:
        if p.grad.is_sparse:
            raise RuntimeError(
                f"{self._owner}: parameter of shape {tuple(p.shape)} has a sparse gradient; "
                f"{self._owner} needs dense gradients (use torch.optim.SparseAdam for sparse "
                "embeddings)"
            )
        return p.grad
