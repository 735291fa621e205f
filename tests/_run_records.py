"""A run's result record as ``msconv compare`` summarises it, from a validation curve, for the
summary tests."""


def run_record(mode, history, wall=1.0):
    """``history``: [(work units, PSNR), ...]; wall-clock is a tenth of the work at every point."""
    return {"mode": mode, "conv": "standard", "psnr": history[-1][1], "ssim": 0.5, "work_units": history[-1][0],
            "flops": 1, "wall_clock_s": wall, "iterations": 10,
            "val_history": [{"work_units": w, "wall_clock_s": w / 10, "psnr": p} for w, p in history]}
