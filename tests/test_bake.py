"""msconv.nn.bake: MFConv2d (MFConv3d) layers frozen into exact nn.Conv2d (nn.Conv3d) at one grid scale."""
import pytest
import torch
import torch.nn as nn

import msconv
from conftest import TOL
from msconv.nn import MFConv2d, MFConv3d, bake

pytestmark = pytest.mark.filterwarnings("ignore::msconv.nn.UnresolvedSigmaWarning")

SCALES = [1.0, 0.5, 2.0]
LAYERS = [
    {},
    {"stride": 2},
    {"stride": 3, "padding_mode": "reflect", "order": 3},
    {"padding_mode": "circular", "groups": 2, "bias": False},
    {"padding_mode": "replicate", "kernel_size": 5, "stride": 2},
    {"sigma_floor": None},
    {"learn_sigma": True},
]


def _net(**kw):
    torch.manual_seed(0)
    return nn.Sequential(MFConv2d(4, 6, **kw), nn.ReLU(), MFConv2d(6, 2, 3))


def _assert_exact(baked, model, x, scale):
    with msconv.grid_scale(scale):
        want = model(x)
    atol, rtol = TOL[torch.float32]
    torch.testing.assert_close(baked(x), want, atol=atol, rtol=rtol)


@pytest.mark.parametrize("kw", LAYERS, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()) or "default")
@pytest.mark.parametrize("scale", SCALES)
def test_baked_model_computes_the_mf_model_at_its_scale(kw, scale):
    model = _net(**kw)
    baked = bake(model, grid_scale=scale)
    assert not any(isinstance(m, MFConv2d) for m in baked.modules())
    assert [type(m) for m in baked] == [nn.Conv2d, nn.ReLU, nn.Conv2d]
    conv, layer = baked[0], model[0]
    assert (conv.stride, conv.groups, conv.padding_mode) == (layer.stride, layer.groups, layer.padding_mode)
    assert (conv.bias is None) == (layer.bias is None) and conv.dilation == (1, 1)
    for hw in ((17, 16), (20, 23)):  # odd and even: the strided output cells ceil(H/S)
        _assert_exact(baked, model, torch.randn(2, 4, *hw), scale)


def test_bake_copies_and_leaves_the_input_alone():
    model = _net()
    model[2] = model[0] = MFConv2d(4, 4, 3)  # one layer in two places stays one conv
    before = {k: v.clone() for k, v in model.state_dict().items()}
    baked = bake(model)
    assert isinstance(model[0], MFConv2d) and baked is not model and baked[0] is baked[2]
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert isinstance(bake(MFConv2d(2, 2, 3)), nn.Conv2d)
    frozen = MFConv2d(2, 2, 3).requires_grad_(False)
    assert not bake(frozen).weight.requires_grad


def test_bake_bad_arguments():
    with pytest.raises(ValueError, match="grid_scale must be a finite number > 0.*grid_scale=0"):
        bake(_net(), grid_scale=0)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        bake("net")
    with pytest.raises(TypeError, match="TorchScript"):
        bake(torch.jit.script(nn.Conv2d(2, 2, 3)))


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_baked_model_scripts_traces_and_reloads(scale, tmp_path):
    model = _net(stride=2, padding_mode="reflect")
    baked = bake(model, scale)
    x = torch.randn(2, 4, 19, 16)
    for name, frozen in (("script", torch.jit.script(baked)), ("trace", torch.jit.trace(baked, x))):
        path = tmp_path / f"{name}.pt"
        torch.jit.save(frozen, str(path))
        _assert_exact(torch.jit.load(str(path)), model, x, scale)


@pytest.mark.parametrize("scale", [1.0, 0.5, 2.0])
def test_baked_model_exports_to_onnx(scale, tmp_path):
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    model = _net(stride=2, padding_mode="circular")
    baked = bake(model, scale).eval()
    x = torch.randn(1, 4, 21, 18)
    path = tmp_path / "baked.onnx"
    torch.onnx.export(baked, (x,), str(path), dynamo=False, input_names=["x"], output_names=["y"])
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (y,) = session.run(None, {"x": x.numpy()})
    with msconv.grid_scale(scale):
        want = model(x)
    torch.testing.assert_close(torch.from_numpy(y), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("stride", [1, 2, (1, 2, 2), 3])
@pytest.mark.parametrize("scale", [1.0, 0.5, 2.0])
def test_baked_mfconv3d_is_the_exact_conv3d(stride, scale):
    torch.manual_seed(0)
    net = nn.Sequential(MFConv3d(2, 3, 3, stride, spacing=(2.0, 1.0, 1.0)), nn.ReLU(), MFConv3d(3, 1, 3, groups=1))
    baked = bake(net, grid_scale=scale)
    assert [type(m) for m in baked] == [nn.Conv3d, nn.ReLU, nn.Conv3d]
    assert baked[0].stride == net[0].stride and baked[0].dilation == (1, 1, 1)
    for size in ((8, 8, 8), (9, 10, 11)):  # odd sizes: the strided output cells ceil(n/S)
        x = torch.rand(1, 2, *size)
        with torch.no_grad(), msconv.grid_scale(scale):
            want = net(x)
        torch.testing.assert_close(baked(x), want, atol=1e-5, rtol=1e-5)
