"""Failures a user meets get one clear line and an exit code, found before the training they would
waste: bad sizes and thread counts, an unusable MSCONV_BACKEND or MSCONV_DIST_TIMEOUT, images too
small to score, a full disk, Ctrl-C, a closed pipe, a binary --config; and nothing trained is lost
to an evaluation error."""
import errno
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from msconv.cli import main
from msconv.train import TrainConfig, Trainer
from msconv.train.checkpoint import CheckpointError
from msconv.train.config import ConfigError

from _photo_data import photo_dir  # noqa: F401 - the fixture (tests/_photo_data.py)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_args(photo_dir, out, *extra):
    return ["--data", photo_dir, "--crop", "32", "--depth", "2", "--width", "4", "--batch-size", "2",
            "--iterations", "4", "--val-crop", "32", "--val-points", "1", "--no-progress", "--no-tensorboard",
            "--threads", "1", "--out", str(out), *extra]


def tiny(photo_dir, out, **kw):
    base = dict(data=photo_dir, crop=32, depth=2, width=4, batch_size=2, iterations=6, val_crop=32, val_points=1,
                progress=False, tensorboard=False, out=str(out), threads=1, ckpt_every=2)
    base.update(kw)
    return TrainConfig(**base)


def _small_images(folder, side, n=2):
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray((rng.random((side, side)) * 255).astype(np.uint8)).save(os.path.join(folder, f"s{i}.png"))
    return str(folder)


@pytest.mark.parametrize("option,value", [("--width", "-4"), ("--depth", "0"), ("--threads", "-3"),
                                          ("--max-steps", "0"), ("--blocks", "-1"), ("--max-megapixels", "0")])
def test_sizes_and_counts_below_one_are_refused_by_name(photo_dir, tmp_path, capsys, option, value):
    # Before: a RuntimeError traceback from torch (negative dimension, set_num_threads).
    assert main(["train", *tiny_args(photo_dir, tmp_path / "r"), option, value]) == 2
    err = capsys.readouterr().err
    assert f"{option} must be" in err and value in err and "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine where the CUDA kernels cannot run")
def test_an_unusable_msconv_backend_is_refused_at_start_up(photo_dir, tmp_path, capsys, monkeypatch):
    # Before: a RuntimeError traceback at the first coarse step of --mode fmg.
    monkeypatch.setenv("MSCONV_BACKEND", "cuda")
    assert main(["train", *tiny_args(photo_dir, tmp_path / "r"), "--mode", "fmg", "--levels", "1"]) == 2
    err = capsys.readouterr().err
    assert "MSCONV_BACKEND='cuda'" in err and "Unset MSCONV_BACKEND" in err
    assert not (tmp_path / "r" / "metrics.csv").exists()  # refused before any step


def test_a_bad_msconv_dist_timeout_is_a_clear_error_not_an_import_crash(monkeypatch):
    # Before: ValueError at import of msconv.train.execution (every msconv train/compare crashed).
    env = {**os.environ, "MSCONV_DIST_TIMEOUT": "abc", "PYTHONPATH": ROOT}
    p = subprocess.run([sys.executable, "-c", "import msconv.train.execution, msconv.cli"], env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    from msconv.train.execution import dist_timeout

    for bad in ("abc", "-1", "0", "inf", "nan"):
        monkeypatch.setenv("MSCONV_DIST_TIMEOUT", bad)
        with pytest.raises(ConfigError, match=f"MSCONV_DIST_TIMEOUT='{bad}' must be a number of seconds > 0"):
            dist_timeout()
    monkeypatch.setenv("MSCONV_DIST_TIMEOUT", "12.5")
    assert dist_timeout() == 12.5


def test_info_into_a_closed_pipe_exits_quietly():
    # Before: BrokenPipeError traceback from `msconv info --json | head -c 10`.
    p = subprocess.Popen([sys.executable, "-m", "msconv", "info", "--json"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": ROOT})
    p.stdout.close()  # the reader goes away (as `head -c 10` does) before msconv writes: every write fails
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == 141 and "Traceback" not in err and "BrokenPipe" not in err


def test_a_binary_config_file_is_named_in_a_one_line_error(photo_dir, tmp_path, capsys):
    # Before: "msconv: error: 'utf-8' codec can't decode byte 0xff": no file, no fix.
    cfg = tmp_path / "model.pt"
    cfg.write_bytes(b"\x00\x01PK\xff\xfe" * 10)
    assert main(["train", *tiny_args(photo_dir, tmp_path / "r"), "--config", str(cfg)]) == 2
    assert "is not a text file" in capsys.readouterr().err


@pytest.mark.parametrize("option,task", [("--val-data", "denoise"), ("--val-data", "sr"), ("--test-data", "denoise")])
def test_images_too_small_to_score_are_found_at_start_up_by_file_and_option(photo_dir, tmp_path, capsys, option, task):
    # Before: validation failed at step 0 without naming the file; a too-small --test-data image
    # failed after all the training, and result.json and model.pt were never written.
    small = _small_images(tmp_path / "small", 1 if task == "sr" else 5)
    out = tmp_path / "r"
    assert main(["train", *tiny_args(photo_dir, out), option, small, "--task", task]) == 2
    err = capsys.readouterr().err
    assert f"{option}: image 's0.png'" in err and "needs at least 7 on every side" in err
    assert not (out / "checkpoint.pt").exists()


def test_the_model_is_saved_before_the_test_evaluation_that_may_fail(photo_dir, tmp_path):
    t = Trainer(tiny(photo_dir, tmp_path / "r", test_data=photo_dir, iterations=2))
    real = t.evaluator.validate

    def failing(pairs=None):
        if pairs is t.test_pairs:
            raise RuntimeError("out of memory on a full-size test image")
        return real(pairs)

    t.evaluator.validate = failing
    with pytest.raises(RuntimeError, match="out of memory"):
        t.run()
    assert (tmp_path / "r" / "model.pt").exists()
    r = json.loads((tmp_path / "r" / "result.json").read_text())
    assert r["complete"] and r["test_psnr"] is None and np.isfinite(r["psnr"])


def test_a_full_disk_during_a_checkpoint_keeps_the_last_one_and_says_how_to_resume(photo_dir, tmp_path, monkeypatch):
    import msconv.train.trainer as trainer_module

    real, calls = trainer_module.save_atomic, []

    def save(obj, path):
        calls.append(path)
        if len(calls) == 2:  # checkpoints at steps 2, 4, 6: the one of step 4 fails
            raise OSError(errno.ENOSPC, "No space left on device", path)
        real(obj, path)

    monkeypatch.setattr(trainer_module, "save_atomic", save)
    with pytest.raises(CheckpointError, match=r"of step 4 \(No space left on device\); the checkpoint of step 2 .* "
                                              r"is intact.*again with --resume"):
        Trainer(tiny(photo_dir, tmp_path / "r")).run()
    monkeypatch.setattr(trainer_module, "save_atomic", real)
    ref = Trainer(tiny(photo_dir, tmp_path / "ref")).run()
    r = Trainer(tiny(photo_dir, tmp_path / "r", resume=True)).run()
    assert r["complete"] and r["psnr"] == ref["psnr"]  # resumed from step 2, exactly


def test_ctrl_c_says_where_the_checkpoint_is_and_exits_130(photo_dir, tmp_path, capsys, monkeypatch):
    import msconv.train.trainer as trainer_module

    def interrupt(trainer, step):
        if step == 3:
            raise KeyboardInterrupt

    real_init = trainer_module.Trainer.__init__
    monkeypatch.setattr(trainer_module.Trainer, "__init__",
                        lambda self, cfg, on_step=None, data=None: real_init(self, cfg, interrupt, data))
    out = tmp_path / "r"
    assert main(["train", *tiny_args(photo_dir, out, "--ckpt-every", "2")]) == 130
    err = capsys.readouterr().err
    assert "interrupted at step 3; the checkpoint of step 2" in err and "--resume" in err
    assert not (out / ".msconv-lock").exists()  # the folder is free for the resume
    monkeypatch.setattr(trainer_module.Trainer, "__init__", real_init)
    assert main(["train", "--resume", "--out", str(out)]) == 0


def test_bench_checks_its_out_path_before_running(tmp_path):
    # Before: the benchmark ran to the end, then failed to write /proc/x with a traceback.
    p = subprocess.run([sys.executable, "-m", "msconv", "bench", "transfer", "--smoke", "--out", "/proc/x/y.csv"],
                       capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": ROOT}, cwd=ROOT)
    assert p.returncode == 2 and "argument --out: cannot write '/proc/x/y.csv'" in p.stderr
    assert "Traceback" not in p.stderr and "device:" not in p.stdout  # nothing was measured


def _png_header(path, width, height):
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


def test_a_genuine_huge_photo_has_a_reachable_remedy(tmp_path, photo_dir, capsys):
    # Before: "damaged or malicious", remedy: raise PIL.Image.MAX_IMAGE_PIXELS (unreachable from the CLI).
    from msconv.data import ImageReadError, load_image

    big = tmp_path / "data" / "pano.png"
    big.parent.mkdir()
    _png_header(big, 20000, 20000)
    with pytest.raises(ImageReadError, match=r"20000x20000 = 400000000 pixels.*--max-megapixels 400.*1\.6 GB"):
        load_image(str(big))
    with pytest.raises(ImageReadError) as e:  # past the limit the decoder runs (and finds this file truncated)
        load_image(str(big), max_megapixels=400)
    assert "megapixels" not in str(e.value)
    assert main(["train", *tiny_args(photo_dir, tmp_path / "r"), "--test-data", str(big.parent)]) == 2
    assert "--max-megapixels 400" in capsys.readouterr().err


def _rank_script(tmp_path, body: str) -> str:
    path = tmp_path / "rank_script.py"
    path.write_text("import os, sys\n" + body)
    return str(path)


def test_torchrun_ranks_given_different_options_refuse_naming_the_option(photo_dir, tmp_path):
    # Before: rank 1 with --seed 5 trained to exit 0, its final weights differing from rank 0's by up to 1.53.
    script = _rank_script(tmp_path, (
        "from msconv.cli import main\n"
        "argv = sys.argv[1:] + (['--seed', '5'] if os.environ['RANK'] == '1' else [])\n"
        "raise SystemExit(main(['train', *argv]))\n"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT, "MSCONV_DIST_TIMEOUT": "60"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", script,
           *tiny_args(photo_dir, tmp_path / "r")]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode != 0
    assert "torchrun: rank 1 has option seed = 5, rank 0 has 0" in p.stderr


def _broadcast_worker(rank, world, init_file, results):
    import torch.distributed as dist

    from msconv.train.execution import broadcast_from_rank0

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(rank)  # a different initialisation on every rank
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2))
    model[1].running_mean.fill_(rank)
    broadcast_from_rank0(model)
    results[rank] = {k: v.clone() for k, v in model.state_dict().items()}
    dist.destroy_process_group()


def test_every_rank_starts_from_rank_0s_weights(tmp_path):
    import torch.multiprocessing as mp

    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_broadcast_worker, args=(2, str(tmp_path / "init"), results), nprocs=2, join=True)
    torch.manual_seed(0)
    ref = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2)).state_dict()
    for rank in (0, 1):
        for k, v in ref.items():
            assert torch.equal(results[rank][k], v), (rank, k)


# ------------------------------------------------------------------ the library: foreign states, wrong callables


@pytest.mark.parametrize("name", ["LARS", "LAMB"])
def test_an_optimizer_refuses_another_optimizers_state_by_name(name):
    # Before: LAMB.load_state_dict(adam_state) raised a bare KeyError 'max_trust_ratio' at the next step.
    import msconv.optim

    model = torch.nn.Linear(3, 3)
    adam = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 3)).sum().backward()
    adam.step()
    opt = getattr(msconv.optim, name)(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=f"{name}.load_state_dict: the state is another optimizer's"):
        opt.load_state_dict(adam.state_dict())
    getattr(msconv.optim, name)(model.parameters(), lr=0.1).load_state_dict(opt.state_dict())  # its own loads


def test_mge_refuses_an_mlmc_allocation_that_could_never_adapt():
    # Before: MGE(levels=1, batch_sizes=1, allocation="mlmc") trained with fixed sizes, silently.
    from msconv import MGE

    with pytest.raises(ValueError, match=r"'mlmc' measures each level's variance from at least 2 samples.*\[1, 1\]"):
        MGE(levels=1, batch_sizes=1, allocation="mlmc")
    assert MGE(levels=1, batch_sizes=2, allocation="mlmc").batch_sizes == [2, 2]


def _fmg(**kw):
    from msconv.multilevel import FullMultiscale

    return FullMultiscale(levels=1, iterations=4, batch_sizes=2, **kw)


@pytest.mark.parametrize("fn", [lambda: None, lambda sizes, level, extra: None])
def test_a_sample_batches_of_the_wrong_arity_is_refused_when_the_schedule_is_built(fn):
    # Before: a bare TypeError from inside the first step.
    with pytest.raises(TypeError, match=r"sample_batches\(.*\) cannot be called as sample_batches\(batch_sizes\)"):
        _fmg(sample_batches=fn)
    _fmg(sample_batches=lambda sizes, level=0: None)  # what a sampler may look like


def test_the_lightning_callback_refuses_a_string_loss_and_foreign_states():
    pytest.importorskip("pytorch_lightning")
    from msconv.lightning import MultiscaleTraining

    fmg = _fmg(dataset=torch.utils.data.TensorDataset(torch.rand(8, 1, 32, 32)))
    # Before: loss_fn="mse" was accepted and failed at the first step.
    with pytest.raises(TypeError, match="loss_fn must be a function"):
        MultiscaleTraining(fmg, loss_fn="mse")
    cb = MultiscaleTraining(fmg)
    # Before: AttributeError / KeyError, or (another callback's keys) silently accepted.
    for foreign in ({"best_model_score": 1.0}, [1], {"schedule": 5}):
        with pytest.raises((ValueError, TypeError), match="state"):
            cb.load_state_dict(foreign)
    cb.load_state_dict({})  # a checkpoint saved before the first step


def test_bench_is_not_advertised_where_the_benchmarks_are_not_installed(monkeypatch, capsys):
    import msconv.cli as cli

    assert "bench" in cli.build_parser().format_help()  # a source checkout has them
    monkeypatch.setattr(cli, "_bench_dir", lambda: "/nonexistent")  # as in a wheel
    assert "bench" not in cli.build_parser().format_help()
    assert cli.main(["bench", "all"]) == 2
    assert "not installed with msconv" in capsys.readouterr().err
