"""A fuzz pass over what a new user can get wrong: every training option with hostile values, data
folders full of odd files, and the library's constructors. Each case must end in one of two ways:

* a clear error: ConfigError / ValueError / TypeError (or ImageReadError, FileNotFoundError for
  data) whose message names the option or file at fault, never a deep traceback of another kind;
* accepted, and then correct: the run builds (and, in the slow class, trains two steps to finite
  numbers), images load finite in [0, 1].

Nothing may hang (pytest-timeout) and nothing may be silently wrong. The slow class (marked ``slow``)
also trains every accepted option value for two steps.
"""
import math
import os
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from msconv.train import TrainConfig
from msconv.train.config import ConfigError

from _photo_data import photo_dir  # noqa: F401 - the fixture (tests/_photo_data.py)

TINY = dict(crop=32, depth=2, width=4, batch_size=2, iterations=4, val_crop=32, val_points=1, progress=False,
            tensorboard=False, threads=1, levels=1)

# Hostile values by option type. Strings that are not choices, numbers at and beyond every edge.
_BY_TYPE = {
    "int": [-1, 0, 1.5, "x", True, None, float("nan"), 2 ** 40],
    "float": [-1.0, 0.0, float("nan"), float("inf"), "x", True, None, 1e300],
    "str": ["", "nonexistent", 5, None],
    "list": [[], [0], [-1], "x", [1.5], None, [2 ** 40]],
    "bool": ["maybe", 2, None],
}
# Options where a value is an action on the file system or the process, fuzzed by their own tests.
_NOT_HERE = {"out", "resume", "overwrite", "device", "data", "val_data", "test_data", "inject_nan_at", "max_steps"}
# Accepted values that would make a plan too big to build here (they are accepted and correct: the
# plan is lazy, but the model or crop is allocated).
_TOO_BIG = {("depth", 2 ** 40), ("width", 2 ** 40), ("blocks", 2 ** 40), ("crop", 2 ** 40), ("batch_size", 2 ** 40),
            ("small_crop", 2 ** 40), ("small_batch", 2 ** 40), ("fmg_crop", 2 ** 40), ("threads", 2 ** 40),
            ("mf_order", 2 ** 40), ("batch_sizes", (2 ** 40,))}


def _option_cases():
    cases = []
    for f in TrainConfig.fields():
        if f.name in _NOT_HERE:
            continue
        for v in _BY_TYPE[f.type]:
            key = (f.name, tuple(v) if isinstance(v, list) else v)
            if key in _TOO_BIG:
                continue
            cases.append(pytest.param(f.name, v, id=f"{f.name}={v!r}"))
    return cases


OPTION_CASES = _option_cases()


@pytest.fixture(scope="module")
def tiny_data(photo_dir):
    from msconv.data import load_dataset

    return load_dataset(photo_dir, None, True, 0.34, 0)


def _names_option(message: str, name: str) -> bool:
    return name in message or name.replace("_", "-") in message


def _outcome(name, value, photo_dir, tiny_data, steps: int = 0, tmp_path=None):
    """'error' (clear, naming the option) or 'accepted' (and the run built, or trained ``steps`` steps);
    anything else fails the test."""
    from msconv.train.run import build_run

    d = {**TINY, "data": photo_dir, name: value}
    if name == "levels" and isinstance(value, int) and not isinstance(value, bool) and value > 3:
        d["crop"] = 32  # the crop check names --crop then; also a clear error
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cfg = TrainConfig.from_dict(d, source="fuzz").validated()
            if steps:
                from msconv.train import Trainer

                r = Trainer(cfg.replace(out=str(tmp_path / "r"), max_steps=steps), data=tiny_data).run()
                # Finite, or a broken model reported as NaN (the CLI then exits 3), never a score.
                psnrs = [v["psnr"] for v in r["val_history"]]
                assert all(map(math.isfinite, psnrs)) or math.isnan(r["psnr"]), (name, value, psnrs)
            else:
                run = build_run(cfg, data=tiny_data)
                assert run.total_steps >= 1 and all(s.iterations >= 1 for s in run.stages)
                assert all(math.isfinite(float(p.sum())) for p in run.model.parameters())
    except (ConfigError, ValueError, TypeError) as e:
        msg = str(e)
        assert _names_option(msg, name) or (name == "levels" and "--crop" in msg) or (
            name == "task" and "--" in msg), f"{name}={value!r}: the error does not name the option: {msg}"
        assert "\n" not in msg.strip() or len(msg) < 2000
        return "error"
    return "accepted"


@pytest.mark.parametrize("name,value", OPTION_CASES)
def test_an_option_value_is_refused_by_name_or_builds_a_sound_run(name, value, photo_dir, tiny_data):
    _outcome(name, value, photo_dir, tiny_data)


@pytest.mark.slow
@pytest.mark.parametrize("name,value", OPTION_CASES)
def test_an_accepted_option_value_trains_to_finite_numbers(name, value, photo_dir, tiny_data, tmp_path):
    _outcome(name, value, photo_dir, tiny_data, steps=2, tmp_path=tmp_path)


def test_the_option_fuzz_is_wide():
    assert len(OPTION_CASES) >= 250


# ------------------------------------------------------------------ data folders


def _write(folder, name, kind):
    path = os.path.join(folder, name)
    rng = np.random.default_rng(len(name))
    if kind == "text":
        open(path, "w").write("not an image")
    elif kind == "empty":
        open(path, "wb").close()
    elif kind == "dir":
        os.makedirs(path)
    elif kind == "broken_link":
        os.symlink(os.path.join(folder, "missing.png"), path)
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "truncated":
        Image.fromarray((rng.random((64, 64)) * 255).astype(np.uint8)).save(path)
        data = open(path, "rb").read()
        open(path, "wb").write(data[: len(data) // 2])
    elif kind.startswith("mode_"):
        mode = kind[5:]
        a = (rng.random((48, 48, 4)) * 255).astype(np.uint8)
        im = Image.fromarray(a, "RGBA").convert(mode)
        im.save(path)
    elif kind == "uint16":
        Image.fromarray((rng.random((48, 48)) * 65535).astype(np.uint16)).save(path)
    elif kind == "float_01":
        Image.fromarray(rng.random((48, 48)).astype(np.float32)).save(path)
    elif kind == "float_high":
        Image.fromarray((rng.random((48, 48)) * 888).astype(np.float32)).save(path)
    elif kind == "float_negative":
        Image.fromarray((rng.random((48, 48)) - 0.5).astype(np.float32)).save(path)
    elif kind == "float_nan":
        a = rng.random((48, 48)).astype(np.float32)
        a[3, 3] = np.nan
        Image.fromarray(a).save(path)
    elif kind == "int32_high":
        Image.fromarray((rng.random((48, 48)) * 1e6).astype(np.int32)).save(path)
    elif kind == "constant":
        Image.fromarray(np.full((48, 48), 7, np.uint8)).save(path)
    elif kind == "tiny":
        Image.fromarray(np.full((3, 3), 7, np.uint8)).save(path)
    elif kind == "one_row":
        Image.fromarray((rng.random((1, 500)) * 255).astype(np.uint8)).save(path)
    else:
        raise AssertionError(kind)
    return path


DATA_CASES = [
    ("a.png", "text"), ("a.png", "empty"), ("a.png", "dir"), ("a.png", "broken_link"), ("a.png", "fifo"),
    ("a.png", "truncated"), ("a.png", "mode_L"), ("a.png", "mode_LA"), ("a.png", "mode_P"), ("a.png", "mode_RGB"),
    ("a.png", "mode_RGBA"), ("a.jpg", "mode_CMYK"), ("a.png", "mode_1"), ("a.tif", "mode_I"), ("a.tif", "mode_F"),
    ("a.png", "uint16"), ("a.tif", "float_01"), ("a.tif", "float_high"), ("a.tif", "float_negative"),
    ("a.tif", "float_nan"), ("a.tif", "int32_high"), ("a.png", "constant"), ("a.png", "tiny"), ("a.png", "one_row"),
    ("A.PNG", "mode_L"), ("a.tiff", "uint16"), ("a.bmp", "mode_RGB"), ("a.jpeg", "mode_L"),
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("gray", [True, False], ids=["gray", "rgb"])
@pytest.mark.parametrize("name,kind", DATA_CASES, ids=[f"{k}-{n}" for n, k in DATA_CASES])
def test_an_odd_file_in_a_data_folder_is_refused_by_name_skipped_or_loaded_sound(tmp_path, name, kind, gray):
    from msconv.data import ImageReadError, load_folder

    folder = str(tmp_path / "data")
    os.makedirs(folder)
    _write(folder, "good.png", "mode_L")
    _write(folder, name, kind)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ds = load_folder(folder, gray)
    except (ImageReadError, FileNotFoundError, ValueError) as e:
        assert name in str(e), f"{kind}: the error does not name the file: {e}"
        return
    skipped = name not in ds.names and kind != "dir"  # a folder named a.png is a folder: its images are read
    if skipped:  # only what is not a regular file may be skipped, and never silently
        assert any(name in str(w.message) for w in caught), f"{kind}: skipped without a word"
    for im in ds.images:
        assert im.dtype == torch.float32 and im.shape[0] == (1 if gray else 3)
        assert bool(torch.isfinite(im).all()) and float(im.min()) >= 0 and float(im.max()) <= 1
    if not skipped and kind.startswith("float_") or kind == "int32_high":
        im = ds.images[ds.names.index(name)]
        assert float((im == 1).float().mean()) < 0.05, f"{kind}: saturated"  # never clipped to mush


# ------------------------------------------------------------------ the library's constructors


def _api_cases():
    from msconv import MGE, FullMultiscale
    from msconv.multilevel.schedule import plan
    from msconv.optim import LAMB, LARS

    p = lambda: [torch.nn.Parameter(torch.zeros(3))]  # noqa: E731
    return [
        ("MGE levels=-1", lambda: MGE(levels=-1, batch_sizes=2), "levels"),
        ("MGE levels=1.5", lambda: MGE(levels=1.5, batch_sizes=2), "levels"),
        ("MGE batch 0", lambda: MGE(levels=1, batch_sizes=0), "batch_sizes"),
        ("MGE batch list short", lambda: MGE(levels=2, batch_sizes=[2, 2]), "batch_sizes"),
        ("MGE batch nan", lambda: MGE(levels=1, batch_sizes=float("nan")), "batch_sizes"),
        ("MGE allocation unknown", lambda: MGE(levels=1, batch_sizes=2, allocation="best"), "allocation"),
        ("MGE restriction unknown", lambda: MGE(levels=1, batch_sizes=2, restriction="median"), "restriction"),
        ("MGE mlmc batch 1", lambda: MGE(levels=1, batch_sizes=1, allocation="mlmc"), "mlmc"),
        ("FMG iterations 0", lambda: FullMultiscale(levels=1, iterations=0, batch_sizes=2), "iterations"),
        ("FMG iterations -3", lambda: FullMultiscale(levels=1, iterations=-3, batch_sizes=2), "iterations"),
        ("FMG iterations list short", lambda: FullMultiscale(levels=2, iterations=[2, 2], batch_sizes=2), "iterations"),
        ("FMG levels 0", lambda: FullMultiscale(levels=-1, iterations=2, batch_sizes=2), "levels"),
        ("FMG dataset and sampler", lambda: FullMultiscale(levels=1, iterations=2, batch_sizes=2, dataset=[1],
                                                           sample_batches=lambda s: s), "dataset"),
        ("plan budget -100", lambda: plan("fmg", levels=1, batch_sizes=[2], budget=-100), "budget"),
        ("plan budget nan", lambda: plan("fmg", levels=1, batch_sizes=[2], budget=float("nan")), "budget"),
        ("plan levels -1", lambda: plan("fmg", levels=-1, batch_sizes=2, budget=10), "levels"),
        ("plan batch_sizes []", lambda: plan("fmg", levels=1, batch_sizes=[], budget=10), "batch_sizes"),
        ("plan iteration_ratio 0", lambda: plan("fmg", levels=1, batch_sizes=[2], budget=10, iteration_ratio=0),
         "iteration_ratio"),
        ("plan mode unknown", lambda: plan("fast", levels=1, batch_sizes=2, budget=10), "mode"),
        ("LARS lr -1", lambda: LARS(p(), lr=-1), "lr"),
        ("LARS lr nan", lambda: LARS(p(), lr=float("nan")), "lr"),
        ("LARS momentum 2", lambda: LARS(p(), lr=0.1, momentum=2), "momentum"),
        ("LARS trust_coefficient -1", lambda: LARS(p(), lr=0.1, trust_coefficient=-1), "trust_coefficient"),
        ("LARS weight_decay nan", lambda: LARS(p(), lr=0.1, weight_decay=float("nan")), "weight_decay"),
        ("LAMB betas (2, 0)", lambda: LAMB(p(), lr=0.1, betas=(2, 0)), "betas"),
        ("LAMB eps -1", lambda: LAMB(p(), lr=0.1, eps=-1), "eps"),
        ("LAMB lr inf", lambda: LAMB(p(), lr=float("inf")), "lr"),
        ("LAMB no params", lambda: LAMB([], lr=0.1), "parameter"),
    ]


def _api_ids():
    try:
        return [c[0] for c in _api_cases()]
    except Exception:  # noqa: BLE001 - collection must not die here; the test reports it
        return None


@pytest.mark.parametrize("case", range(len(_api_ids() or [])), ids=_api_ids())
def test_a_bad_library_argument_is_a_clear_error_naming_it(case):
    name, call, word = _api_cases()[case]
    with pytest.raises((ValueError, TypeError)) as e:
        call()
    assert word in str(e.value), f"{name}: {e.value}"


def test_transfer_ops_refuse_bad_inputs_by_name():
    from msconv import prolong, restrict

    cases = [
        (lambda: restrict(torch.rand(1, 1, 8, 8), kind="median"), "kind"),
        (lambda: restrict(torch.rand(8, 8)), "4 dimensions"),
        (lambda: restrict(torch.rand(1, 1, 8, 8, dtype=torch.float64).to(torch.int32)), "dtype"),
        (lambda: prolong(torch.rand(1, 1, 4, 4), kind="nearest-ish"), "kind"),
    ]
    for call, word in cases:
        with pytest.raises((ValueError, TypeError, RuntimeError)) as e:
            call()
        assert word.lower() in str(e.value).lower(), str(e.value)


# ------------------------------------------------------------------ the command line, end to end

CLI_CASES = [
    # (subcommand args after the tiny options, accepted exit codes)
    (["train", "--mode", "nonsense"], {2}),
    (["train", "--task", "sr", "--sr-scale", "3"], {2}),
    (["train", "--crop", "30", "--mode", "fmg", "--levels", "2"], {2}),
    (["train", "--mode", "mge", "--levels", "2", "--batch-sizes", "1,2"], {2}),
    (["train", "--device", "cuda:7"], {2} if not torch.cuda.is_available() else {0, 2}),
    (["train", "--data", "/nonexistent/photos"], {2}),
    (["train", "--config", "/nonexistent.yaml"], {2}),
    (["train", "--val-fraction", "0"], {2}),
    (["train", "--val-fraction", "1"], {2}),
    (["train", "--val-fraction", "nan"], {2}),
    (["train", "--noise-sigma", "-5"], {2}),
    (["train", "--task", "deblur", "--blur-sigma", "0"], {2}),
    (["train", "--task", "inpaint", "--mask-fraction", "1.5"], {2}),
    (["train", "--budget", "1e-9"], {0, 2}),
    (["train", "--mode", "fmg", "--levels", "1", "--iterations", "1"], {2}),
    (["train", "--mode", "fmg", "--levels", "1", "--iterations", "2"], {0}),
    (["train", "--precision", "fp16"], {0}),
    (["train", "--lr", "1e6", "--max-skips", "2"], {0, 3}),
    (["train", "--resume"], {4}),
    (["compare", "--modes", ""], {2}),
    (["compare", "--modes", "fmg,nonsense"], {2}),
    (["compare", "--modes", ",,,"], {2}),
]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("args,codes", CLI_CASES, ids=[" ".join(a) for a, _ in CLI_CASES])
def test_a_command_line_ends_in_a_result_or_one_clear_line(photo_dir, tmp_path, capsys, args, codes):
    from msconv.cli import main

    base = ["--data", photo_dir, "--crop", "32", "--depth", "2", "--width", "4", "--batch-size", "2",
            "--iterations", "4", "--val-crop", "32", "--val-points", "1", "--no-progress", "--no-tensorboard",
            "--threads", "1", "--out", str(tmp_path / "r")]
    if args[0] == "compare":
        base = [a for a in base if a != "--iterations" and a != "4"] + ["--budget", "16"]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rc = main([args[0], *base, *args[1:]])
    except SystemExit as e:  # argparse's own refusals
        rc = e.code
    err = capsys.readouterr().err
    assert rc in codes, f"exit {rc}: {err[-1500:]}"
    assert "Traceback" not in err
    if rc == 2:
        assert "error" in err.lower()
