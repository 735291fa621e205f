"""Tests for msconv.optim: LARS (paper form and its options), LAMB and the warm-up/poly schedule.

Every numerical claim is checked against a formula written out here in plain Python or
float64 torch, never against the implementation itself.
"""

from __future__ import annotations

import copy
import importlib.util
import io
import math
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from msconv.optim import LAMB, LARS, WarmupPolyLR, lamb, lars, warmup_poly, warmup_poly_factor

F64 = torch.float64
ROOT = Path(__file__).resolve().parents[1]
BOTH_PATHS = pytest.mark.parametrize("foreach", [False, True], ids=["loop", "foreach"])


def t64(*values):
    return torch.tensor(values, dtype=F64)


def leaf(*values):
    p = t64(*values).requires_grad_()
    return p


def norm(x):
    return math.sqrt(sum(v * v for v in x))


# ------------------------------------------------------------------------- worked example

# One paper-form LARS step by hand: w = [3, 4], g = [0.8, −0.6], β = 0.01, η = 1e-3, m = 0.9,
# γ = 1.0, v = 0: ‖w‖ = 5, ‖g‖ = 1, λ = η‖w‖ / (‖g‖ + β‖w‖), w₁ = w − γλ(g + βw).
W0, G0, BETA, ETA, MOM = (3.0, 4.0), (0.8, -0.6), 0.01, 1e-3, 0.9
LAM1 = 0.0047619048  # 0.005 / (1 + 0.05)
W1 = (2.9960476190, 4.0026666667)


@BOTH_PATHS
@pytest.mark.parametrize("tensor_lr", [False, True])
def test_paper_form_worked_example_and_second_step_with_new_lr(foreach, tensor_lr):
    w = leaf(*W0)
    lr = torch.tensor(1.0, dtype=F64) if tensor_lr else 1.0
    opt = LARS([w], lr=lr, momentum=MOM, weight_decay=BETA, trust_coefficient=ETA,
               foreach=foreach)
    w.grad = t64(*G0)
    opt.step()
    torch.testing.assert_close(w.detach(), t64(*W1), rtol=0, atol=1e-9)
    # v1 = γ·λ·(g + βw0), so λ can be read back from the buffer.
    v1 = opt.state[w]["momentum_buffer"]
    lam = v1 / (t64(*G0) + BETA * t64(*W0))
    torch.testing.assert_close(lam, t64(LAM1, LAM1), rtol=0, atol=1e-9)

    # Second step, γ = 0.5, g2 = [−0.3, 0.4], by hand (40-digit decimal arithmetic):
    # ‖w1‖ = 4.99977..., λ2 = η‖w1‖/(‖g2‖ + β‖w1‖) = 0.0090905193,
    # v2 = m·v1 + γ·λ2·(g2 + βw1) = [0.0023297431, −0.0003999645], w2 = w1 − v2.
    if tensor_lr:
        opt.param_groups[0]["lr"].fill_(0.5)
    else:
        opt.param_groups[0]["lr"] = 0.5
    w.grad = t64(-0.3, 0.4)
    opt.step()
    torch.testing.assert_close(
        opt.state[w]["momentum_buffer"], t64(0.0023297431068, -0.0003999645489), rtol=0, atol=1e-12
    )
    torch.testing.assert_close(w.detach(), t64(2.9937178759408, 4.0030666312156), rtol=0, atol=1e-12)


@BOTH_PATHS
def test_combined_denominator_differs_from_paper_and_matches_its_formula(foreach):
    out = {}
    for den in ("paper", "combined"):
        w = leaf(*W0)
        w.grad = t64(*G0)
        LARS([w], lr=1.0, momentum=MOM, weight_decay=BETA, denominator=den, foreach=foreach).step()
        out[den] = w.detach()
    d = [g + BETA * w for g, w in zip(G0, W0)]  # [0.83, −0.56]
    lam_c = ETA * norm(W0) / norm(d)  # 0.005 / 1.00125 = 0.0049937617
    assert abs(lam_c - 0.0049937617) < 1e-9
    expected = t64(*(w - lam_c * di for w, di in zip(W0, d)))
    torch.testing.assert_close(out["combined"], expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(out["combined"], t64(2.9958551778, 4.0027965065), rtol=0, atol=1e-9)
    assert (out["combined"] - out["paper"]).abs().max() > 1e-5


@BOTH_PATHS
def test_weight_decay_changes_the_result(foreach):
    out = {}
    for beta in (0.0, BETA):
        w = leaf(*W0)
        w.grad = t64(*G0)
        LARS([w], lr=1.0, momentum=MOM, weight_decay=beta, foreach=foreach).step()
        out[beta] = w.detach()
    lam0 = ETA * norm(W0) / norm(G0)  # β = 0: λ = 0.005, step λ·g
    torch.testing.assert_close(out[0.0], t64(*(w - lam0 * g for w, g in zip(W0, G0))), rtol=0, atol=1e-12)
    torch.testing.assert_close(out[BETA], t64(*W1), rtol=0, atol=1e-9)
    assert (out[0.0] - out[BETA]).abs().max() > 1e-4


# --------------------------------------------------------------------- options and edges


@BOTH_PATHS
@pytest.mark.parametrize("tensor_lr", [False, True])
def test_larc_clip_on_both_sides_of_the_threshold(foreach, tensor_lr):
    d = t64(*(g + BETA * w for g, w in zip(G0, W0)))
    for gamma, rate in ((1e-3, 1e-3), (1.0, LAM1)):  # γ < λ: rate γ;  γ > λ: rate λ
        w = leaf(*W0)
        w.grad = t64(*G0)
        lr = torch.tensor(gamma, dtype=F64) if tensor_lr else gamma
        LARS([w], lr=lr, momentum=MOM, weight_decay=BETA, trust_clip=True, foreach=foreach).step()
        torch.testing.assert_close(w.detach(), t64(*W0) - rate * d, rtol=0, atol=1e-9)
    # Unclipped, γ = 1e-3 gives γ·λ, a thousand times smaller than the clipped step.
    w = leaf(*W0)
    w.grad = t64(*G0)
    LARS([w], lr=1e-3, momentum=MOM, weight_decay=BETA, foreach=foreach).step()
    torch.testing.assert_close(w.detach(), t64(*W0) - 1e-3 * LAM1 * d, rtol=0, atol=1e-12)


def _sgd_twin(params, lr, nesterov):
    return torch.optim.SGD(params, lr=lr, momentum=MOM, nesterov=nesterov, weight_decay=0.0)


@BOTH_PATHS
@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("how", ["exclude_1d", "lars_exclude"])
def test_excluded_params_get_plain_momentum_sgd(foreach, nesterov, how):
    torch.manual_seed(0)
    bias = torch.randn(7, dtype=F64, requires_grad=True)
    conv = torch.randn(4, 3, 3, 3, dtype=F64, requires_grad=True)
    ref_bias = bias.detach().clone().requires_grad_()
    ref_conv = conv.detach().clone().requires_grad_()
    if how == "exclude_1d":
        opt = LARS([bias, conv], lr=0.1, momentum=MOM, weight_decay=0.05, nesterov=nesterov,
                   exclude_1d=True, foreach=foreach)
    else:
        opt = LARS([{"params": [bias], "lars_exclude": True}, {"params": [conv]}], lr=0.1,
                   momentum=MOM, weight_decay=0.05, nesterov=nesterov, foreach=foreach)
    ref = _sgd_twin([ref_bias], lr=0.1, nesterov=nesterov)  # no λ, no weight decay
    for _ in range(4):
        g = torch.randn(7, dtype=F64)
        bias.grad, ref_bias.grad = g, g.clone()
        conv.grad = torch.randn_like(conv)
        opt.step()
        ref.step()
        # With a constant rate, v_LARS = γ·buf_SGD, so the iterates coincide.
        torch.testing.assert_close(bias, ref_bias, rtol=1e-13, atol=1e-15)
    # ...while the 4-D tensor in the same optimizer is adapted (λ ≈ 1e-3 ≠ 1).
    assert (conv - ref_conv).abs().max() < 0.1 * 0.05
    assert opt.param_groups[-1]["lars_exclude"] is False


@BOTH_PATHS
def test_zero_weights_and_zero_grads_give_finite_updates_with_lambda_one(foreach):
    lr = 0.5
    zero_w = torch.zeros(3, 2, dtype=F64, requires_grad=True)  # ‖w‖ = 0 -> λ = 1
    zero_g = leaf(3.0, 4.0)  # ‖g‖ = 0 -> λ = 1, only the decay term moves w
    both = torch.zeros(5, dtype=F64, requires_grad=True)
    # combined: g = −βw exactly (β = 0.25 is a power of two), so ‖g + βw‖ = 0 -> λ = 1, d = 0
    cancel = leaf(3.0, 4.0)
    g_zero_w = torch.full((3, 2), 0.25, dtype=F64)
    zero_w.grad, zero_g.grad, both.grad = g_zero_w.clone(), torch.zeros(2, dtype=F64), torch.zeros(5, dtype=F64)
    cancel.grad = t64(-0.75, -1.0)
    for den in ("paper", "combined"):
        params = [p.detach().clone().requires_grad_() for p in (zero_w, zero_g, both, cancel)]
        for p, q in zip(params, (zero_w, zero_g, both, cancel)):
            p.grad = q.grad.clone()
        opt = LARS(params[:3], lr=lr, momentum=MOM, weight_decay=BETA, denominator=den, foreach=foreach)
        opt.add_param_group({"params": [params[3]], "weight_decay": 0.25})
        opt.step()
        assert all(torch.isfinite(p).all() for p in params)
        torch.testing.assert_close(params[0].detach(), -lr * g_zero_w, rtol=0, atol=1e-15)
        torch.testing.assert_close(params[1].detach(), t64(3.0, 4.0) * (1 - lr * BETA), rtol=0, atol=1e-15)
        assert torch.equal(params[2].detach(), torch.zeros(5, dtype=F64))
        if den == "combined":
            torch.testing.assert_close(params[3].detach(), t64(3.0, 4.0), rtol=0, atol=1e-15)


@BOTH_PATHS
def test_norm_floor_moves_a_zero_initialised_layer_like_a_he_initialised_one(foreach):
    # A zero conv (8 out-channels) and a zero 1-d bias: the floor is ρ·sqrt(2·8) = ρ·4 for the
    # conv (its He-init norm), ρ·sqrt(3) for the bias (unit RMS); the paper would take λ = 1.
    rho, lr, beta = 0.5, 2.0, 1e-2
    zero = torch.zeros(8, 3, 3, 3, dtype=F64, requires_grad=True)
    big = (10 * torch.ones(4, 2, dtype=F64)).requires_grad_()  # ‖w‖ = 10·sqrt(8) > floor ρ·sqrt(8)
    bias = torch.zeros(3, dtype=F64, requires_grad=True)
    g = torch.linspace(-1, 1, zero.numel(), dtype=F64).view(zero.shape)
    zero.grad, big.grad, bias.grad = g.clone(), torch.full((4, 2), 0.5, dtype=F64), t64(1.0, 2.0, 3.0)
    LARS([zero, big, bias], lr=lr, momentum=MOM, weight_decay=beta, norm_floor=rho, foreach=foreach).step()
    lam = ETA * rho * math.sqrt(2 * 8) / (g.norm() + 0)  # ‖w‖ = 0: no decay term in the denominator
    torch.testing.assert_close(zero.detach(), -lr * lam * g, rtol=1e-12, atol=0)
    wn = 10 * math.sqrt(8)
    lam_big = ETA * wn / (0.5 * math.sqrt(8) + beta * wn)  # the paper's λ: floor inactive
    torch.testing.assert_close(big.detach(), torch.full((4, 2), 10 - lr * lam_big * (0.5 + beta * 10), dtype=F64),
                               rtol=1e-12, atol=0)
    gb = t64(1.0, 2.0, 3.0)
    torch.testing.assert_close(bias.detach(), -lr * (ETA * rho * math.sqrt(3) / gb.norm()) * gb, rtol=1e-12, atol=0)


def test_lamb_norm_floor_formula():
    rho, lr = 2.0, 1e-2
    w = torch.zeros(2, 5, requires_grad=True, dtype=F64)
    g = torch.linspace(-1, 1, 10, dtype=F64).view(2, 5)
    w.grad = g.clone()
    LAMB([w], lr=lr, norm_floor=rho).step()
    u = g / (g.abs() + 1e-6)  # first bias-corrected Adam direction
    lam = rho * math.sqrt(2 * 2) / u.norm()
    torch.testing.assert_close(w.detach(), -lr * lam * u, rtol=1e-12, atol=0)


@BOTH_PATHS
@pytest.mark.parametrize("opt_name", ["lars", "lamb"])
def test_step_does_not_modify_grad(foreach, opt_name):
    torch.manual_seed(0)
    params = [torch.randn(6, 3, 3, 3, requires_grad=True), torch.randn(6, requires_grad=True)]
    grads = [torch.randn_like(p) for p in params]
    for p, g in zip(params, grads):
        p.grad = g
    saved = [(g.clone(), g.data_ptr()) for g in grads]
    if opt_name == "lars":
        opt = LARS(params, lr=1.0, weight_decay=0.1, nesterov=True, denominator="combined",
                   foreach=foreach)
    else:
        opt = LAMB(params, lr=1e-2, weight_decay=0.1, foreach=foreach)
    for _ in range(2):
        opt.step()
    for p, g, (copy, ptr) in zip(params, grads, saved):
        assert p.grad is g and g.data_ptr() == ptr
        assert torch.equal(g, copy)


def test_bfloat16_params_use_float32_norms():
    torch.manual_seed(0)
    w32 = torch.randn(64, 32)
    g32 = torch.randn(64, 32) * 1e-2
    wb = w32.bfloat16().requires_grad_()
    wb.grad = g32.bfloat16()
    ref = wb.detach().float().requires_grad_()
    ref.grad = wb.grad.float()
    for p in (wb, ref):
        LARS([p], lr=5.0, weight_decay=1e-3, foreach=True).step()
    assert wb.dtype == torch.bfloat16
    torch.testing.assert_close(wb.detach().float(), ref.detach(), rtol=2e-2, atol=2e-2)


# ------------------------------------------------------------------- foreach == loop


def _mixed_params(dtype=torch.float32):
    torch.manual_seed(1)
    shapes = [(8, 3, 3, 3), (8,), (4, 8, 1, 1), (), (5, 7), (3,)]
    ps = [torch.randn(s, dtype=dtype, requires_grad=True) for s in shapes]
    ps.append(torch.randn(2, 3, dtype=F64, requires_grad=True))  # a second dtype bucket
    return ps


def _run_twice(make_opt, steps=5):
    """The same optimizer config with foreach off and on; grads None on some steps."""
    results = []
    for foreach in (False, True):
        ps = _mixed_params()
        opt = make_opt(ps, foreach)
        gen = torch.Generator().manual_seed(2)
        for t in range(steps):
            for i, p in enumerate(ps):
                skip = (t + i) % 3 == 0  # every tensor misses some steps
                p.grad = None if skip else torch.randn(p.shape, generator=gen, dtype=p.dtype)
            opt.step()
        results.append((ps, opt))
    return results


LARS_VARIANTS = {
    "paper": {},
    "nesterov": {"nesterov": True},
    "combined": {"denominator": "combined"},
    "clip": {"trust_clip": True},
    "no_momentum": {"momentum": 0.0},
    "eps": {"eps": 1e-3, "weight_decay": 0.0},
    "norm_floor": {"norm_floor": 4.0},  # active on some tensors, not on others
}


@pytest.mark.parametrize("variant", list(LARS_VARIANTS))
@pytest.mark.parametrize("tensor_lr", [False, True])
def test_lars_foreach_equals_loop(variant, tensor_lr):
    def make(ps, foreach):
        kw = {"weight_decay": 1e-2, **LARS_VARIANTS[variant]}
        lr = torch.tensor(2.0) if tensor_lr else 2.0
        groups = [
            {"params": ps[:3]},
            {"params": ps[3:5], "lars_exclude": True, "lr": 0.3 if not tensor_lr else torch.tensor(0.3)},
            {"params": ps[5:], "trust_coefficient": 2e-2},
        ]
        return LARS(groups, lr=lr, exclude_1d=True, foreach=foreach, **kw)

    (loop_ps, loop_opt), (fe_ps, fe_opt) = _run_twice(make)
    for a, b in zip(loop_ps, fe_ps):
        assert torch.equal(a, b), "foreach and loop paths must agree bitwise"
    for a, b in zip(loop_ps, fe_ps):
        sa, sb = loop_opt.state[a], fe_opt.state[b]
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.equal(sa[k], sb[k])
    assert any(not torch.equal(p, q) for p, q in zip(loop_ps, _mixed_params())), "nothing moved"


@pytest.mark.parametrize("tensor_lr", [False, True])
@pytest.mark.parametrize("kw", [{}, {"bias_correction": False, "max_trust_ratio": 0.5}, {"norm_floor": 4.0}])
def test_lamb_foreach_equals_loop(tensor_lr, kw):
    def make(ps, foreach):
        lr = torch.tensor(1e-2) if tensor_lr else 1e-2
        groups = [{"params": ps[:4]}, {"params": ps[4:], "lars_exclude": True}]
        return LAMB(groups, lr=lr, weight_decay=0.1, exclude_1d=True, foreach=foreach, **kw)

    (loop_ps, loop_opt), (fe_ps, fe_opt) = _run_twice(make)
    for a, b in zip(loop_ps, fe_ps):
        assert torch.equal(a, b)
        for k in loop_opt.state[a]:
            assert torch.equal(loop_opt.state[a][k], fe_opt.state[b][k])


# --------------------------------------------------------------------------------- LAMB


def _lamb_reference(w, grads, lr, b1, b2, eps, wd, adapted, bias_correction=True, max_trust=None):
    """LAMB written out in float64 from the paper's formulas."""
    w = w.clone()
    m = torch.zeros_like(w)
    v = torch.zeros_like(w)
    for t, g in enumerate(grads, start=1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        mh, vh = (m / (1 - b1**t), v / (1 - b2**t)) if bias_correction else (m, v)
        u = mh / (vh.sqrt() + eps)
        if adapted:
            u = u + wd * w
            wn, un = w.norm().item(), u.norm().item()
            lam = wn / un if wn > 0 and un > 0 else 1.0
            if max_trust is not None:
                lam = min(lam, max_trust)
        else:
            lam = 1.0
        w = w - lr * lam * u
    return w


@BOTH_PATHS
@pytest.mark.parametrize("kw", [{}, {"bias_correction": False}, {"max_trust_ratio": 0.05}])
def test_lamb_matches_hand_written_formula(foreach, kw):
    torch.manual_seed(3)
    w2d = torch.randn(6, 5, dtype=F64, requires_grad=True)
    b1d = torch.randn(6, dtype=F64, requires_grad=True)
    start = (w2d.detach().clone(), b1d.detach().clone())
    grads = [(torch.randn(6, 5, dtype=F64), torch.randn(6, dtype=F64)) for _ in range(4)]
    opt = LAMB([w2d, b1d], lr=0.05, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1,
               exclude_1d=True, foreach=foreach, **kw)
    for g2, g1 in grads:
        w2d.grad, b1d.grad = g2, g1
        opt.step()
    args = dict(lr=0.05, b1=0.8, b2=0.95, eps=1e-6, wd=0.1,
                bias_correction=kw.get("bias_correction", True), max_trust=kw.get("max_trust_ratio"))
    ref2 = _lamb_reference(start[0], [g[0] for g in grads], adapted=True, **args)
    ref1 = _lamb_reference(start[1], [g[1] for g in grads], adapted=False, **args)
    torch.testing.assert_close(w2d.detach(), ref2, rtol=0, atol=1e-12)
    torch.testing.assert_close(b1d.detach(), ref1, rtol=0, atol=1e-12)
    assert opt.state[w2d]["step"].item() == 4 and opt.state[w2d]["step"].dtype == F64


def test_lamb_zero_weights_and_zero_grads_are_finite():
    w = torch.zeros(4, 4, requires_grad=True)
    z = torch.ones(3, 3, requires_grad=True)
    w.grad, z.grad = torch.full((4, 4), 0.5), torch.zeros(3, 3)
    LAMB([w, z], lr=0.1, weight_decay=0.01).step()
    # ‖w‖ = 0 -> λ = 1: a plain bias-corrected Adam step of size lr·g/(|g| + eps) ≈ lr.
    torch.testing.assert_close(w.detach(), torch.full((4, 4), -0.1), rtol=1e-5, atol=1e-6)
    # g = 0 -> u = βw, λ = ‖w‖/‖βw‖ = 1/β: the step is lr·w, not NaN.
    torch.testing.assert_close(z.detach(), torch.full((3, 3), 0.9), rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------- state_dict, scaler, sync


def _train(opt_cls, ps, opt, sched, steps, gen):
    for _ in range(steps):
        for p in ps:
            p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
        opt.step()
        sched.step()


@pytest.mark.parametrize("opt_cls", [LARS, LAMB])
def test_state_dict_round_trip_with_weights_only_load_continues_exactly(opt_cls):
    def build(ps):
        opt = opt_cls([{"params": ps[:2]}, {"params": ps[2:], "lars_exclude": True}],
                      lr=torch.tensor(0.5 if opt_cls is LARS else 1e-2), weight_decay=1e-2,
                      exclude_1d=True)
        return opt, warmup_poly(opt, warmup_steps=2, total_steps=10)

    ps = _mixed_params()
    opt, sched = build(ps)
    _train(opt_cls, ps, opt, sched, 3, torch.Generator().manual_seed(5))

    buf = io.BytesIO()
    torch.save({"params": [p.detach() for p in ps], "opt": opt.state_dict(),
                "sched": sched.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    ps2 = [p.clone().requires_grad_() for p in ckpt["params"]]
    opt2, sched2 = build(ps2)
    opt2.load_state_dict(ckpt["opt"])
    sched2.load_state_dict(ckpt["sched"])
    assert opt2.param_groups[1]["lars_exclude"] is True
    assert float(opt2.param_groups[0]["lr"]) == float(opt.param_groups[0]["lr"])

    _train(opt_cls, ps, opt, sched, 4, torch.Generator().manual_seed(6))
    _train(opt_cls, ps2, opt2, sched2, 4, torch.Generator().manual_seed(6))
    for a, b in zip(ps, ps2):
        assert torch.equal(a, b)
    for a, b in zip(ps, ps2):
        for k, v in opt.state[a].items():
            assert torch.equal(v, opt2.state[b][k])


@pytest.mark.parametrize("opt_cls", [LARS, LAMB])
def test_grad_scaler_skips_inf_step_and_leaves_state_untouched(opt_cls):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3), torch.nn.Conv2d(4, 1, 1))
    opt = opt_cls(model.parameters(), lr=0.1 if opt_cls is LARS else 1e-2, weight_decay=1e-3,
                  exclude_1d=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    x = torch.randn(3, 2, 8, 8)

    def backward():
        opt.zero_grad()
        scaler.scale(model(x).square().mean()).backward()

    backward()
    scaler.step(opt)  # a normal first step, so there is state to protect
    scaler.update()
    params = [p.detach().clone() for p in model.parameters()]
    state = {(i, k): v.clone() for i, p in enumerate(model.parameters())
             for k, v in opt.state[p].items()}

    backward()
    next(model.parameters()).grad[0, 0, 0, 0] = float("inf")
    scale = scaler.get_scale()
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == scale / 2  # the scaler saw the inf...
    for p, q in zip(model.parameters(), params):  # ...and the optimizer never ran
        assert torch.equal(p.detach(), q)
    after = {(i, k): v for i, p in enumerate(model.parameters()) for k, v in opt.state[p].items()}
    assert after.keys() == state.keys() and len(state) >= 4
    for key, v in after.items():
        assert torch.equal(v, state[key]), key

    # A finite step through the scaler equals an unscaled step of a twin optimizer.
    twin_params = [p.detach().clone().requires_grad_() for p in model.parameters()]
    twin = opt_cls(twin_params, lr=0.1 if opt_cls is LARS else 1e-2, weight_decay=1e-3,
                   exclude_1d=True)
    twin.load_state_dict(copy.deepcopy(opt.state_dict()))  # else the buffers are shared
    backward()
    unscaled = [p.grad / scaler.get_scale() for p in model.parameters()]
    scaler.step(opt)
    for p, g in zip(twin_params, unscaled):
        p.grad = g
    twin.step()
    for p, q in zip(model.parameters(), twin_params):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-7)


class _FailOnHostSync(TorchDispatchMode):
    """Raise on any op that copies a tensor value to a Python number."""

    SYNC_OPS = {"_local_scalar_dense", "item", "is_nonzero", "equal"}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in self.SYNC_OPS:
            raise AssertionError(f"host synchronisation in step(): {func}")
        return func(*args, **(kwargs or {}))


def test_host_sync_detector_can_fail():
    with pytest.raises(AssertionError, match="host synchronisation"):
        with _FailOnHostSync():
            torch.ones(2).sum().item()
    with pytest.raises(AssertionError, match="host synchronisation"):
        with _FailOnHostSync():
            bool(torch.ones(()) > 0)


@BOTH_PATHS
@pytest.mark.parametrize("tensor_lr", [False, True])
@pytest.mark.parametrize(
    "make",
    [
        lambda ps, lr, fe: LARS(ps, lr=lr, weight_decay=1e-2, exclude_1d=True, foreach=fe),
        lambda ps, lr, fe: LARS(ps, lr=lr, weight_decay=1e-2, nesterov=True, trust_clip=True,
                                denominator="combined", norm_floor=1.0, foreach=fe),
        lambda ps, lr, fe: LAMB(ps, lr=lr, weight_decay=1e-2, exclude_1d=True,
                                max_trust_ratio=5.0, norm_floor=1.0, foreach=fe),
    ],
    ids=["lars", "lars_options", "lamb"],
)
def test_step_has_no_host_synchronisation(make, tensor_lr, foreach):
    ps = _mixed_params()
    opt = make(ps, torch.tensor(0.1) if tensor_lr else 0.1, foreach)
    for _ in range(2):  # the first step (state creation) and a later one
        for p in ps:
            p.grad = torch.randn_like(p)
        with _FailOnHostSync():
            opt.step()


# --------------------------------------------------------------------- torch.compile


def _compiled_run(opt_cls, kwargs, backend, steps=8):
    """Compile opt.step once (fullgraph) and follow a warm-up/poly schedule on a tensor lr."""
    import torch._dynamo
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()

    def setup():
        ps = _mixed_params()[:6]
        groups = [{"params": ps[:4]}, {"params": ps[4:], "lars_exclude": True}]
        opt = opt_cls(groups, lr=torch.tensor(kwargs.pop("lr0", 0.5)), **kwargs)
        return ps, opt, warmup_poly(opt, warmup_steps=3, total_steps=steps + 2)

    kwargs = dict(kwargs)
    lr0 = kwargs.pop("lr", 0.5)
    kwargs["lr0"] = lr0
    ps_c, opt_c, sched_c = setup()
    kwargs["lr0"] = lr0
    ps_e, opt_e, sched_e = setup()
    counter = CompileCounterWithBackend(backend)
    step = torch.compile(opt_c.step, backend=counter, fullgraph=True)
    gen = torch.Generator().manual_seed(7)
    lrs = []
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(steps):
            for pc, pe in zip(ps_c, ps_e):
                pc.grad = torch.randn(pc.shape, generator=gen, dtype=pc.dtype)
                pe.grad = pc.grad.clone()
            step()
            opt_e.step()
            lrs.append(float(opt_c.param_groups[0]["lr"]))
            sched_c.step()
            sched_e.step()
    return counter, lrs, ps_c, ps_e, opt_c, opt_e


@pytest.mark.parametrize(
    "opt_cls,kwargs",
    [
        (LARS, {"weight_decay": 1e-2, "exclude_1d": True, "foreach": True}),
        (LARS, {"weight_decay": 1e-2, "nesterov": True, "trust_clip": True,
                "denominator": "combined", "norm_floor": 1.0, "foreach": False}),
        (LAMB, {"lr": 1e-2, "weight_decay": 1e-2, "exclude_1d": True, "norm_floor": 1.0,
                "foreach": True}),
    ],
    ids=["lars_foreach", "lars_loop_options", "lamb_foreach"],
)
def test_compiled_step_fullgraph_no_recompiles_across_schedule(opt_cls, kwargs):
    counter, lrs, ps_c, ps_e, opt_c, opt_e = _compiled_run(opt_cls, kwargs, "aot_eager")
    assert counter.frame_count == 1, "the lr schedule must not trigger a recompilation"
    assert not torch._dynamo.utils.counters["graph_break"]
    assert len(set(lrs)) >= 6, f"the schedule should have changed lr: {lrs}"
    assert lrs[:3] == pytest.approx([lrs[2] / 3, 2 * lrs[2] / 3, lrs[2]])
    for a, b in zip(ps_c, ps_e):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert opt_c._opt_called  # schedulers still see that step() ran


def test_recompile_detector_fires_for_a_float_lr():
    # The check above can fail: a float lr is a graph constant, so changing it recompiles.
    import torch._dynamo

    torch._dynamo.reset()
    p = torch.randn(3, 3, requires_grad=True)
    p.grad = torch.randn(3, 3)
    opt = LARS([p], lr=0.5)
    step = torch.compile(opt.step, backend="eager", fullgraph=True)
    step()
    opt.param_groups[0]["lr"] = 0.25
    with torch._dynamo.config.patch(error_on_recompile=True):
        with pytest.raises(Exception, match="(?i)recompil"):
            step()
    torch._dynamo.reset()


def test_compiled_step_with_inductor_matches_eager():
    # The real backend once (about 10 s on two cores): generated kernels, same numbers.
    counter, _, ps_c, ps_e, _, _ = _compiled_run(
        LARS, {"weight_decay": 1e-2, "exclude_1d": True, "foreach": True}, "inductor", steps=4
    )
    assert counter.frame_count == 1
    for a, b in zip(ps_c, ps_e):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------ warmup_poly


def test_warmup_poly_values_with_any_optimizer():
    p = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([p], lr=1.0)
    sched = warmup_poly(opt, warmup_steps=2, total_steps=6)
    assert isinstance(sched, torch.optim.lr_scheduler.LambdaLR)
    lrs = []
    for _ in range(8):
        lrs.append(opt.param_groups[0]["lr"])
        p.grad = torch.zeros(1)
        opt.step()
        sched.step()
    # warm-up (t+1)/W, then (1 − (t−W)/(T−W))², then 0 from T on.
    assert lrs == pytest.approx([0.5, 1.0, 1.0, 0.5625, 0.25, 0.0625, 0.0, 0.0])


def test_warmup_poly_without_warmup_is_poly_decay_and_power_is_used():
    T = 10
    for t in range(T + 2):
        assert warmup_poly_factor(t, 0, T) == pytest.approx(max(0.0, 1 - t / T) ** 2)
        assert warmup_poly_factor(t, 0, T, power=1) == pytest.approx(max(0.0, 1 - t / T))


def test_warmup_poly_tensor_lr_updated_in_place_and_state_dict_weights_only():
    p = torch.zeros(3, requires_grad=True)
    lr = torch.tensor(2.0)
    opt = LARS([p], lr=lr)
    sched = warmup_poly(opt, warmup_steps=4, total_steps=8)
    group_lr = opt.param_groups[0]["lr"]
    assert float(group_lr) == pytest.approx(0.5)
    for _ in range(5):
        p.grad = torch.ones(3)
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] is group_lr  # same tensor: compiled steps see it
    assert float(group_lr) == pytest.approx(2.0 * (1 - 1 / 4) ** 2)
    buf = io.BytesIO()
    torch.save(sched.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    opt2 = LARS([torch.zeros(3, requires_grad=True)], lr=torch.tensor(2.0))
    sched2 = WarmupPolyLR(opt2, warmup_steps=1, total_steps=2)  # overwritten by the load
    sched2.load_state_dict(state)
    sched2.step()
    sched.step()
    assert float(opt2.param_groups[0]["lr"]) == pytest.approx(float(opt.param_groups[0]["lr"]))
    assert sched2.lr_lambdas[0].total_steps == 8


def test_groups_sharing_the_default_tensor_lr_get_their_own_copy():
    a, b = torch.zeros(2, requires_grad=True), torch.zeros(2, requires_grad=True)
    lr = torch.tensor(1.0)
    opt = LARS([{"params": [a]}, {"params": [b]}], lr=lr)
    la, lb = opt.param_groups[0]["lr"], opt.param_groups[1]["lr"]
    assert la.data_ptr() == lr.data_ptr()  # the user's tensor stays live for group 0
    assert lb.data_ptr() != la.data_ptr()
    torch.optim.lr_scheduler.LambdaLR(opt, [lambda t: 1.0, lambda t: 0.5])
    assert (float(la), float(lb)) == (1.0, 0.5)


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"lr": -0.1}, r"lr must be a finite number >= 0, got lr=-0\.1"),
        ({"lr": torch.tensor([0.1, 0.2])}, r"tensor lr must hold exactly one"),
        ({"lr": "0.1"}, r"lr must be a float"),
        ({"lr": 1.0, "momentum": 1.0}, r"momentum must lie in \[0, 1\), got momentum=1\.0"),
        ({"lr": 1.0, "momentum": -0.5}, r"momentum=-0\.5"),
        ({"lr": 1.0, "weight_decay": -1e-4}, r"weight_decay must be .* got weight_decay=-0\.0001"),
        ({"lr": 1.0, "trust_coefficient": 0.0}, r"trust_coefficient must be > 0"),
        ({"lr": 1.0, "eps": -1.0}, r"eps=-1\.0"),
        ({"lr": 1.0, "denominator": "sum"}, r"unknown denominator='sum'; use 'paper'"),
        ({"lr": 1.0, "momentum": 0.0, "nesterov": True}, r"nesterov=True needs momentum > 0"),
        ({"lr": 1.0, "exclude_1d": "yes"}, r"exclude_1d must be True or False"),
    ],
)
def test_lars_rejects_bad_arguments_naming_them(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        LARS([torch.zeros(2, requires_grad=True)], **kwargs)


def test_bad_param_group_override_and_bad_lamb_and_schedule_arguments():
    p, q = torch.zeros(2, requires_grad=True), torch.zeros(2, requires_grad=True)
    with pytest.raises(ValueError, match=r"momentum=1\.5"):
        LARS([{"params": [p]}, {"params": [q], "momentum": 1.5}], lr=1.0)
    with pytest.raises(TypeError, match=r"only real floating-point"):
        LARS([torch.zeros(2, dtype=torch.long)], lr=1.0)
    with pytest.raises(ValueError, match=r"betas\[1\] must lie in \[0, 1\), got betas\[1\]=1\.0"):
        LAMB([p], betas=(0.9, 1.0))
    with pytest.raises(ValueError, match=r"eps must be > 0"):
        LAMB([p], eps=0.0)
    with pytest.raises(ValueError, match=r"max_trust_ratio must be > 0 or None"):
        LAMB([p], max_trust_ratio=0.0)
    opt = torch.optim.SGD([p], lr=1.0)
    with pytest.raises(ValueError, match=r"total_steps must exceed warmup_steps, got total_steps=5"):
        warmup_poly(opt, warmup_steps=5, total_steps=5)
    with pytest.raises(ValueError, match=r"warmup_steps must be >= 0"):
        warmup_poly(opt, warmup_steps=-1, total_steps=5)
    with pytest.raises(TypeError, match=r"total_steps must be an int"):
        warmup_poly(opt, warmup_steps=1, total_steps=5.0)
    with pytest.raises(ValueError, match=r"power must be a finite number >= 0"):
        warmup_poly(opt, warmup_steps=1, total_steps=5, power=-2)
    with pytest.raises(ValueError, match=r"equal lengths"):
        lars([p], [], [], [True], lr=1.0, momentum=0.0, weight_decay=0.0, trust_coefficient=1e-3,
             eps=0.0, nesterov=False, trust_clip=False, denominator="paper")
    with pytest.raises(ValueError, match=r"equal lengths"):
        lamb([p], [p], [], [], [], [True], lr=1.0, beta1=0.9, beta2=0.9, eps=1e-6,
             weight_decay=0.0, bias_correction=True, max_trust_ratio=None)


@pytest.mark.parametrize("opt_cls", [LARS, LAMB])
@pytest.mark.parametrize(
    "bad,match",
    [
        ({"lr": -0.1}, r"lr must be a finite number >= 0, got lr=-0\.1"),
        ({"lr": torch.tensor(-1.0)}, r"lr must be a finite number >= 0, got lr=-1\.0"),
        ({"eps": float("nan")}, r"eps must be a finite number >= 0, got eps=nan"),
        ({"weight_decay": -1.0}, r"weight_decay must be a finite number >= 0"),
        ({"norm_floor": -1.0}, r"norm_floor must be a finite number >= 0"),
    ],
)
def test_load_state_dict_rejects_invalid_options_with_the_constructors_message(opt_cls, bad, match):
    ps = _mixed_params()[:3]
    opt = opt_cls(ps, lr=0.1, weight_decay=1e-2)
    saved = opt.state_dict()
    saved["param_groups"][0].update(bad)
    before = copy.deepcopy(opt.param_groups[0]["lr"])
    with pytest.raises((ValueError, TypeError), match=match):
        opt.load_state_dict(saved)
    assert opt.param_groups[0]["lr"] == before  # nothing was loaded
    if bad.get("lr") is not None:  # the constructor says exactly the same
        with pytest.raises(ValueError, match=match):
            opt_cls(ps, **bad)


@pytest.mark.parametrize(
    "opt_cls,bad,match",
    [
        (LARS, {"momentum": float("nan")}, r"LARS: momentum must lie in \[0, 1\), got momentum=nan"),
        (LARS, {"momentum": -0.5}, r"momentum=-0\.5"),
        (LARS, {"trust_coefficient": 0.0}, r"trust_coefficient must be > 0"),
        (LARS, {"denominator": "sum"}, r"unknown denominator='sum'"),
        (LAMB, {"betas": (float("nan"), 0.999)}, r"LAMB: betas\[0\] must lie in \[0, 1\), got betas\[0\]=nan"),
        (LAMB, {"eps": 0.0}, r"LAMB: eps must be > 0"),
    ],
)
def test_load_state_dict_rejects_optimizer_specific_options(opt_cls, bad, match):
    ps = _mixed_params()[:3]
    opt = opt_cls(ps, lr=0.1)
    saved = opt.state_dict()
    saved["param_groups"][0].update(bad)
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(saved)
    with pytest.raises(ValueError, match=match):
        opt_cls(ps, lr=0.1, **bad)


def test_load_state_dict_of_an_older_save_without_new_options_still_loads():
    ps = _mixed_params()[:3]
    opt = LARS(ps, lr=0.1)
    saved = opt.state_dict()
    for key in ("norm_floor", "lars_exclude", "foreach"):
        del saved["param_groups"][0][key]
    opt.load_state_dict(saved)
    assert opt.param_groups[0]["norm_floor"] == 0.0 and opt.param_groups[0]["lars_exclude"] is False


def test_closure_is_evaluated_with_grad_and_its_loss_returned():
    w = torch.ones(3, requires_grad=True)
    opt = LARS([w], lr=1.0)

    def closure():
        opt.zero_grad()
        loss = (w * 2).sum()
        loss.backward()
        return loss

    assert opt.step(closure).item() == 6.0
    assert not torch.equal(w.detach(), torch.ones(3))


# -------------------------------------------------------------------- MGE, benchmark


@BOTH_PATHS
def test_one_step_on_combined_multilevel_gradient_equals_formula(foreach):
    """With MGE the trust ratio is computed once per step on the combined
    gradient ĝ; one LARS step on ĝ must equal the formula applied to ĝ."""
    from msconv.multilevel import MGE

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3, padding=1), torch.nn.Tanh(),
                                torch.nn.Conv2d(3, 2, 3, padding=1)).double()
    batches = [(torch.randn(n, 2, 8, 8, dtype=F64), torch.randn(n, 2, 8, 8, dtype=F64)) for n in (2, 4, 8)]
    MGE(2, [2, 4, 8], count_flops=False).loss(model, None, batches).backward()
    w0 = [p.detach().clone() for p in model.parameters()]
    g = [p.grad.clone() for p in model.parameters()]
    lr, beta, eta = 0.5, 1e-2, 1e-3
    LARS(model.parameters(), lr=lr, momentum=MOM, weight_decay=beta, trust_coefficient=eta, foreach=foreach).step()
    for p, w, gh in zip(model.parameters(), w0, g):
        lam = eta * w.norm() / (gh.norm() + beta * w.norm())  # one ratio per tensor, on the combined ĝ
        torch.testing.assert_close(p.detach(), w - lr * lam * (gh + beta * w), rtol=0, atol=1e-14)
        assert torch.equal(p.grad, gh)  # .grad untouched


def _bench_lars():
    spec = importlib.util.spec_from_file_location("bench_lars", ROOT / "bench" / "bench_lars.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_bench_main_returns_exit_code_zero_and_writes_every_optimizer(tmp_path):
    # `msconv bench all` stops at the first benchmark whose main() is truthy: it must be an int.
    bench = _bench_lars()
    out = tmp_path / "lars.csv"
    rc = bench.main(["--params", "2e4", "--repeats", "2", "--min-block-s", "0.001",
                     "--device", "cpu", "--out", str(out)])
    assert rc == 0
    import csv

    rows = list(csv.DictReader(out.open()))
    assert {(r["op"], r["impl"]) for r in rows} == {
        (op, impl) for op in ("sgd", "lars", "adam", "lamb") for impl in ("loop", "foreach")
    }
    assert list(rows[0]) == bench.FIELDS
    assert all(float(r["p20_ms"]) <= float(r["p50_ms"]) <= float(r["p80_ms"]) for r in rows)
    assert 1e4 < int(rows[0]["params"]) <= 2e4


def test_bench_quick_is_small_and_returns_zero(tmp_path, monkeypatch):
    bench = _bench_lars()
    seen = {}
    real_run = bench.run

    def spy(**kw):
        seen.update(kw)
        return real_run(**{**kw, "ops": ("lars",), "impls": ("foreach",)})

    monkeypatch.setattr(bench, "run", spy)
    assert bench.main(["--quick", "--device", "cpu", "--out", str(tmp_path / "q.csv")]) == 0
    assert seen["target_params"] <= 1e5 and seen["repeats"] <= 3
