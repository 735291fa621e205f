"""`msconv export`: a run with mesh-free layers becomes an ONNX / TorchScript / pt2 file that runs
where msconv is not installed and equals the eager model within 1e-5."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import msconv
from msconv.cli import main

from _photo_data import photo_dir  # noqa: F401 - the fixture (tests/_photo_data.py)

# Run in a fresh interpreter that cannot import msconv (the repository is not on its path).
LOADER = r"""
import json, sys
import numpy as np, torch
fmt, path, x_path, out_path = sys.argv[1:]
x = torch.from_numpy(np.load(x_path))
if fmt == "onnx":
    import onnxruntime as ort
    y = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
elif fmt == "torchscript":
    y = torch.jit.load(path)(x).detach().numpy()
else:
    y = torch.export.load(path).module()(x).detach().numpy()
np.save(out_path, y)
try:
    import msconv  # noqa: F401
    print(json.dumps({"msconv_importable": True}))
except ImportError:
    print(json.dumps({"msconv_importable": False}))
"""


@pytest.fixture(scope="module")
def mf_run(photo_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("mf_run") / "run"
    assert main(["train", "--data", photo_dir, "--crop", "32", "--depth", "3", "--width", "4", "--batch-size", "2",
                 "--iterations", "6", "--val-crop", "32", "--val-points", "1", "--no-progress", "--no-tensorboard",
                 "--threads", "1", "--conv", "mf", "--mode", "fmg", "--levels", "1", "--out", str(out)]) == 0
    return out


@pytest.mark.parametrize("fmt", ["onnx", "torchscript", "pt2"])
@pytest.mark.parametrize("scale", [1.0, 2.0])
def test_an_exported_mesh_free_model_runs_without_msconv_and_equals_eager(mf_run, tmp_path, fmt, scale):
    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
    path = str(tmp_path / f"model.{fmt}")
    assert main(["export", str(mf_run), "--format", fmt, "--out", path, "--grid-scale", str(scale)]) == 0
    run = msconv.load_run(str(mf_run))
    x = torch.rand(2, 1, 40, 52)  # another size than the export's example input
    with torch.no_grad(), msconv.grid_scale(scale):
        eager = run.model(x).numpy()
    np.save(tmp_path / "x.npy", x.numpy())
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    p = subprocess.run([sys.executable, "-c", LOADER, fmt, path, str(tmp_path / "x.npy"), str(tmp_path / "y.npy")],
                       capture_output=True, text=True, timeout=300, cwd=str(tmp_path), env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    if json.loads(p.stdout.strip().splitlines()[-1])["msconv_importable"]:
        # An editable install puts msconv on every interpreter's path; the loader did not import it.
        assert "import msconv" not in LOADER.split("try:")[0]
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), eager, atol=1e-5, rtol=1e-5)


def test_export_refuses_an_unknown_format_and_an_unfinished_run(mf_run, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["export", str(mf_run), "--format", "tflite"])
    assert main(["export", str(tmp_path), "--format", "onnx"]) == 2
    assert "no config.json" in capsys.readouterr().err
