"""The CLI is open: `--model package.module:factory` and `--task package.module:TaskClass` train, resume
and load like the zoo's, and a wrong path is a clear error naming the option."""
import pytest
import torch

import msconv
from msconv.cli import main

from _photo_data import photo_dir  # noqa: F401 - the fixture (tests/_photo_data.py)

USER_MODULE = '''
import torch, torch.nn as nn
from msconv.tasks import Task

def tiny_net(in_channels, out_channels):
    return nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, out_channels, 3, padding=1))

class SaltPepper(Task):
    name = "saltpepper"
    def __init__(self, fraction: float = 0.1):
        self.fraction = fraction
    def corrupt(self, y, generator):
        m = torch.rand(y.shape, generator=generator) < self.fraction
        v = (torch.rand(y.shape, generator=generator) < 0.5).to(y.dtype)
        return torch.where(m, v, y), y

NOT_A_TASK = 3
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "user_nets.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "user_nets"


def _args(photo_dir, out, *extra):
    return ["train", "--data", photo_dir, "--crop", "32", "--batch-size", "2", "--iterations", "6", "--val-crop", "32",
            "--val-points", "1", "--no-progress", "--no-tensorboard", "--threads", "1", "--out", str(out), *extra]


@pytest.mark.parametrize("conv", ["standard", "mf"])
def test_a_user_model_and_task_train_and_load_back(photo_dir, tmp_path, user_module, conv):
    out = tmp_path / "run"
    assert main(_args(photo_dir, out, "--model", f"{user_module}:tiny_net", "--task", f"{user_module}:SaltPepper",
                      "--mode", "fmg", "--levels", "1", "--conv", conv)) == 0
    run = msconv.load_run(str(out))
    assert type(run.task).__name__ == "SaltPepper"
    kinds = {type(m).__name__ for m in run.model.modules()}
    assert ("MFConv2d" in kinds) == (conv == "mf")
    state = torch.load(out / "model.pt", weights_only=True)
    assert all(torch.equal(run.model.state_dict()[k], v) for k, v in state.items())


@pytest.mark.parametrize("option,value,match", [
    ("--model", "no_such_module:net", "--model 'no_such_module:net': cannot import it"),
    ("--model", "user_nets:NOT_A_TASK", "is not callable"),
    ("--task", "user_nets:tiny_net", "is not a subclass of msconv.tasks.Task"),
    ("--task", "user_nets:missing", "cannot import it"),
    ("--model", "resnet50", "is not one of"),
])
def test_a_wrong_user_path_is_a_one_line_error(photo_dir, tmp_path, user_module, capsys, option, value, match):
    assert main(_args(photo_dir, tmp_path / "r", option, value)) == 2
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err
