"""Where a run's records go: each sink takes every step's record and every validation.

A record is a dict with the keys of :data:`CsvLog.FIELDS` (missing ones empty). Sinks:

* :class:`CsvLog` — ``metrics.csv``, one row per step (rows past a resumed checkpoint dropped);
* :class:`TensorBoardLog` — scalars through ``torch.utils.tensorboard.SummaryWriter``;
* :class:`ProgressBar` — a tqdm bar with the latest loss, validation PSNR, work and time.
"""
from __future__ import annotations

import csv
import math
import os

__all__ = ["CsvLog", "TensorBoardLog", "ProgressBar"]


class CsvLog:
    """Append-only CSV; on resume, rows past the checkpoint's step are dropped so the log
    matches an uninterrupted run."""

    FIELDS = ["step", "stage", "level", "loss", "lr", "work_units", "flops", "wall_clock_s", "batch_sizes",
              "skipped", "val_psnr", "val_ssim"]

    def __init__(self, path: str, resume_step: int | None = None):
        self.path = path
        if resume_step is None or not os.path.exists(path):
            with open(path, "w", newline="") as fh:
                csv.writer(fh).writerow(self.FIELDS)
        else:
            with open(path, newline="") as fh:
                rows = [r for r in csv.DictReader(fh) if int(r["step"]) <= resume_step]
            with open(path, "w", newline="") as fh:
                w = csv.DictWriter(fh, self.FIELDS)
                w.writeheader()
                w.writerows(rows)

    def write(self, row: dict) -> None:
        with open(self.path, "a", newline="") as fh:
            csv.DictWriter(fh, self.FIELDS).writerow({k: row.get(k, "") for k in self.FIELDS})

    def validation(self, rec: dict) -> None:
        """Validations reach the CSV inside the step's row (``val_psnr``, ``val_ssim``)."""

    def note(self, message: str) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardLog:
    """``train/loss``, ``train/work_units``, ``train/lr``, ``train/stage``, ``train/level`` per step;
    ``val/psnr``, ``val/ssim``, ``val/psnr_vs_work_units`` and (``samples``: a function returning a
    (C, H, W) image in [0, 1]) a sample restoration per validation; the run's options as
    hyperparameters with its final validation scores when it closes. Written to ``folder`` by
    TensorBoard's own ``SummaryWriter`` (the ``tensorboard`` package, in the ``train`` extra)."""

    def __init__(self, folder: str, hparams: dict | None = None, samples=None):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise ImportError(f"--tensorboard needs the tensorboard package ({e}); pip install tensorboard "
                              "(or msconv[train]), or pass --no-tensorboard") from e
        os.makedirs(folder, exist_ok=True)
        self.writer = SummaryWriter(folder)
        # TensorBoard's hyperparameter table takes numbers, strings and booleans only.
        self.hparams = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in (hparams or {}).items()}
        self.samples, self.last = samples, None

    def write(self, row: dict) -> None:
        step, loss = row["step"], row.get("loss")
        if loss is None:  # the row of the initial validation
            return
        self.writer.add_scalar("train/loss", loss if math.isfinite(loss) else float("nan"), step)
        self.writer.add_scalar("train/work_units", row["work_units"], step)
        self.writer.add_scalar("train/lr", row["lr"], step)
        self.writer.add_scalar("train/stage", row["stage"], step)
        self.writer.add_scalar("train/level", row["level"], step)

    def validation(self, rec: dict) -> None:
        self.writer.add_scalar("val/psnr", rec["psnr"], rec["step"])
        self.writer.add_scalar("val/ssim", rec["ssim"], rec["step"])
        self.writer.add_scalar("val/psnr_vs_work_units", rec["psnr"], int(round(rec["work_units"])))
        if self.samples is not None:
            self.writer.add_image("val/input_restored_clean", self.samples(), rec["step"], dataformats="CHW")
        self.last = rec

    def note(self, message: str) -> None:
        pass

    def close(self) -> None:
        if self.hparams and self.last is not None:
            self.writer.add_hparams(self.hparams, {"hparam/val_psnr": self.last["psnr"], "hparam/val_ssim": self.last["ssim"],
                                                   "hparam/work_units": self.last["work_units"]}, run_name=".")
        self.writer.close()


class ProgressBar:
    """A tqdm bar over the planned steps; ``note`` prints a line above it."""

    def __init__(self, total: int, initial: int, desc: str, stages: int, enabled: bool = True):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, initial=initial, disable=not enabled, dynamic_ncols=True, desc=desc, leave=True)
        self.stages = stages
        self.last_psnr = float("nan")

    def write(self, row: dict) -> None:
        if row.get("val_psnr") not in (None, ""):
            self.last_psnr = row["val_psnr"]
        if row.get("loss") is None:
            return
        self.bar.set_postfix_str(
            f"stage {row['stage'] + 1}/{self.stages} level {row['level']} loss {row['loss']:.4g} "
            f"val {self.last_psnr:.2f}dB wu {row['work_units']:.0f} t {row['wall_clock_s']:.0f}s", refresh=False)
        self.bar.update(1)

    def validation(self, rec: dict) -> None:
        self.last_psnr = rec["psnr"]

    def note(self, message: str) -> None:
        self.bar.write(message)

    def close(self) -> None:
        self.bar.close()
