"""msconv.lightning: Full-Multiscale and MGE schedules run by a real Lightning Trainer (CPU, tiny)."""
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

try:
    import lightning.pytorch as pl
except ImportError:
    pl = pytest.importorskip("pytorch_lightning", reason="needs lightning or pytorch-lightning (msconv[lightning])")

import msconv  # noqa: E402
from msconv.lightning import MultiscaleBatch, MultiscaleTraining  # noqa: E402
from msconv.multilevel import MGE, Schedule, Stage  # noqa: E402


def pairs(n=64, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.rand(n, 1, size, size, generator=g)
    return torch.utils.data.TensorDataset(y + 0.1 * torch.randn(y.shape, generator=g), y)


class Denoiser(pl.LightningModule):
    """An ordinary module: forward, a plain training_step, an optimizer with a per-step scheduler."""

    def __init__(self, total_steps: int):
        super().__init__()
        self.net = nn.Conv2d(1, 1, 3, padding=1)
        self.total_steps = total_steps
        self.plain_steps = 0
        self.widths = []

    def forward(self, x):
        self.widths.append(x.shape[-1])
        return self.net(x)

    def training_step(self, batch, batch_idx):
        self.plain_steps += 1
        x, y = batch
        return F.mse_loss(self(x), y)

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.1)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / self.total_steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def trainer(**kwargs):
    opts = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False)
    opts.update(kwargs)
    return pl.Trainer(**opts)


def fit(module, ms, **kwargs):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*number of training batches.*")
        trainer(callbacks=[ms], **kwargs).fit(module, train_dataloaders=ms.dataloader())


def test_full_multiscale_runs_every_stage_and_lightning_steps_the_scheduler():
    torch.manual_seed(0)
    fmg = msconv.FullMultiscale(levels=2, iterations=4, batch_sizes=4, dataset=pairs(), estimator_kwargs={"count_flops": False})
    module = Denoiser(fmg.total_steps)
    before = module.net.weight.detach().clone()
    ms = MultiscaleTraining(fmg, F.mse_loss)
    fit(module, ms)  # default Trainer: max_epochs=1000, yet the run ends with the schedule
    assert [s.steps_run for s in fmg.stages] == [s.iterations for s in fmg.stages] == [4, 2, 1]
    sched = module.trainer.lr_scheduler_configs[0].scheduler
    assert sched.last_epoch == fmg.total_steps == module.trainer.global_step  # stepped once per step, by Lightning
    assert module.plain_steps == 0  # the callback computed every step's loss
    assert module.training_step.__func__ is Denoiser.training_step  # restored after fit
    assert not torch.equal(before, module.net.weight)
    # Coarsest stage first: 16 px data restricted twice (4 px), then MGE over levels 1..2, then 0..2.
    widths = module.widths
    assert widths[:4] == [4, 4, 4, 4] and set(widths[4:]) == {4, 8, 16}


def test_own_training_step_gets_multiscale_batches():
    seen = []

    class Own(Denoiser):
        def training_step(self, batch, batch_idx):
            assert isinstance(batch, MultiscaleBatch)
            seen.append((batch.stage.index, batch.level, len(batch.batches)))
            return batch.loss(self, F.l1_loss)

    sched = Schedule([Stage(base_level=1, levels=0, batch_sizes=[4], iterations=2),
                      Stage(base_level=0, levels=1, batch_sizes=[2, 4], iterations=3)], dataset=pairs(seed=1))
    module = Own(sched.total_steps)
    fit(module, MultiscaleTraining(sched, wrap_training_step=False), max_steps=sched.total_steps)
    assert seen == [(0, 1, 1)] * 2 + [(1, 0, 2)] * 3


def test_loss_is_the_estimators():
    ds = pairs(8, seed=2)
    est = MGE(levels=1, batch_sizes=[2, 2], count_flops=False)
    batch = MultiscaleBatch(Stage(0, 1, [2, 2], 1), 0, 0, [(ds.tensors[0][:2], ds.tensors[1][:2]),
                                                            (ds.tensors[0][2:4], ds.tensors[1][2:4])])
    batch.stage.estimator = est
    net = nn.Conv2d(1, 1, 3, padding=1)
    assert torch.equal(batch.loss(net, F.mse_loss), est.loss(net, F.mse_loss, batch.batches))
    moved = batch.to(torch.float64)
    assert moved.batches[0][0].dtype == torch.float64 and moved.stage is batch.stage
    assert "level=0" in repr(batch)
    with pytest.raises(TypeError, match="MultiscaleTraining"):
        x, y = batch  # a module's plain training_step without the callback


def test_bad_input():
    with pytest.raises(ValueError, match="no data source"):
        MultiscaleTraining(msconv.FullMultiscale(1, 2, 2))
    with pytest.raises(TypeError, match="Schedule"):
        MultiscaleTraining([Stage(0, 0, [1], 1)])
    fmg = msconv.FullMultiscale(1, 4, 2, dataset=pairs(8))
    with pytest.warns(UserWarning, match="max_steps=6"):
        fit(Denoiser(fmg.total_steps), MultiscaleTraining(fmg), max_steps=3)


def test_early_stage_end_fast_forwards_lightnings_scheduler():
    calls = []

    def validate():  # never improves after the first call: each non-final stage ends after 2 calls
        calls.append(1)
        return 1.0

    fmg = msconv.FullMultiscale(levels=1, iterations=[8, 3], batch_sizes=2, dataset=pairs(), validate=validate,
                                validate_every=1, patience=1)
    module = Denoiser(fmg.total_steps)
    fit(module, MultiscaleTraining(fmg))
    assert fmg.stages[0].advanced_early and fmg.stages[0].steps_run < 8 and fmg.stages[1].steps_run == 3
    sched = module.trainer.lr_scheduler_configs[0].scheduler
    assert sched.last_epoch == fmg.total_steps  # ran steps (by Lightning) + skipped ones (fast-forward)


def test_checkpoint_resume_continues_the_schedule_exactly(tmp_path):
    def build():
        torch.manual_seed(0)
        fmg = msconv.FullMultiscale(levels=1, iterations=4, batch_sizes=4, dataset=pairs(seed=3), seed=5,
                                    estimator_kwargs={"count_flops": False})
        return fmg, Denoiser(fmg.total_steps)

    fmg, whole = build()
    fit(whole, MultiscaleTraining(fmg))

    fmg, first = build()
    ms = MultiscaleTraining(fmg)
    with pytest.warns(UserWarning, match="max_steps"):
        t = trainer(callbacks=[ms], max_steps=3)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            t.fit(first, train_dataloaders=ms.dataloader())
    t.save_checkpoint(tmp_path / "stop.ckpt")

    fmg, resumed = build()
    ms = MultiscaleTraining(fmg)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        trainer(callbacks=[ms]).fit(resumed, train_dataloaders=ms.dataloader(), ckpt_path=tmp_path / "stop.ckpt")
    assert resumed.trainer.global_step == fmg.total_steps == 6
    assert [s.steps_run for s in fmg.stages] == [4, 2]
    torch.testing.assert_close(resumed.net.weight, whole.net.weight, rtol=0, atol=1e-6)
