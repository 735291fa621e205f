"""Where and how a run executes: output folder, torchrun processes, device placement, memory
format, compilation, mixed precision and determinism. None of it changes the weights saved."""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch

from msconv.train.config import ConfigError, TrainConfig

__all__ = ["Execution", "make_output_folder", "start_distributed", "check_divisible", "dist_timeout",
           "check_ranks_agree", "broadcast_from_rank0", "check_backend", "RANK_LOCAL_OPTIONS"]

# Options each torchrun process may set for itself: they change where and how fast it runs, not the run.
RANK_LOCAL_OPTIONS = ("progress", "threads", "device")


def dist_timeout() -> float:
    """Seconds a rank waits for its peers (rendezvous and every collective) under torchrun:
    ``MSCONV_DIST_TIMEOUT``, default 300."""
    raw = os.environ.get("MSCONV_DIST_TIMEOUT", "300")
    try:
        v = float(raw)
    except ValueError:
        v = float("nan")
    if not (v > 0 and v != float("inf")):
        raise ConfigError(f"MSCONV_DIST_TIMEOUT={raw!r} must be a number of seconds > 0 (e.g. MSCONV_DIST_TIMEOUT=600), "
                          "or unset for the default 300")
    return v


def check_backend(device: torch.device) -> None:
    """Fail at start-up, not at the first coarse step, when ``MSCONV_BACKEND`` names kernels that cannot
    run on ``device``."""
    from msconv.ops._backend import BACKENDS, _available

    requested = os.environ.get("MSCONV_BACKEND", "auto")
    if requested not in BACKENDS:
        raise ConfigError(f"MSCONV_BACKEND={requested!r} is not one of {BACKENDS}; unset it for the automatic choice")
    why = None if requested == "auto" else _available(requested, device)
    if why is not None:
        raise ConfigError(f"MSCONV_BACKEND={requested!r} cannot run this run's ops on {device}: {why}. Unset "
                          "MSCONV_BACKEND (automatic choice) or set it to 'reference'")


def make_output_folder(out: str) -> None:
    """Create ``out`` (``--out``) or raise :class:`ConfigError` saying why it cannot hold the run."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConfigError(f"--out {out!r} is an existing file, not a folder; give a folder path (it is created if missing)")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--out {out!r}: cannot create the output folder ({e.strerror or e}: {e.filename or out}); "
                          "give a path in a folder you can write to") from None
    probe = os.path.join(out, f".msconv-write-test-{os.getpid()}")
    try:  # os.access is not enough (root, network file systems): try to write
        with open(probe, "w"):
            pass
        os.unlink(probe)
    except OSError as e:
        raise ConfigError(f"--out {out!r} is not writable ({e.strerror or e}); give a folder you can write to") from None


def start_distributed() -> tuple[int, int]:
    """(rank, world size): under ``torchrun`` (``WORLD_SIZE`` > 1) torch.distributed is initialised
    with a timeout, so a hung rank fails its peers instead of blocking them; else (0, 1)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    from msconv.multilevel.distributed import init_distributed

    rank, world, _ = init_distributed(timeout=dist_timeout())
    return rank, world


def check_ranks_agree(what: str, mine: dict) -> None:
    """Under torchrun, raise :class:`ConfigError` on every rank when ``mine`` (name -> value) differs
    from rank 0's, naming the first entry that differs and both values: ranks that train with other
    options or data than rank 0 would average gradients of different problems, silently."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    ref = everyone[0]
    for rank, theirs in enumerate(everyone[1:], start=1):
        for k in sorted(set(ref) | set(theirs)):
            if ref.get(k) != theirs.get(k):
                raise ConfigError(f"torchrun: rank {rank} has {what} {k} = {theirs.get(k)!r}, rank 0 has {ref.get(k)!r}; "
                                  "every process must get the same options and data (the same command line)")


def broadcast_from_rank0(module: torch.nn.Module) -> None:
    """Under torchrun, every rank's parameters and buffers become rank 0's (as DDP does at wrap time)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    with torch.no_grad():
        for t in module.state_dict().values():
            dist.broadcast(t, src=0)


def check_divisible(cfg: TrainConfig, world: int) -> None:
    """Every level's batch must split equally over ``world`` processes; ConfigError otherwise."""
    from msconv.train.run import base_batch_sizes

    sizes = base_batch_sizes(cfg)
    if any(n % world for n in sizes):
        raise ConfigError(f"torchrun with {world} processes shares every level's batch equally, but the batch sizes "
                          f"are {sizes}; use --batch-size{'s' if cfg.batch_sizes else ''} a multiple of {world} "
                          f"(e.g. --batch-size {max(world, cfg.batch_size // world * world)})")


@dataclass
class Execution:
    """How the training steps run: ``forward_model`` is what they call (the compiled model, or the
    model itself), ``memory_format`` what their inputs are moved to, :meth:`autocast` their
    precision, ``scaler`` fp16's gradient scaler (None otherwise)."""

    rank: int
    world: int
    device: torch.device
    memory_format: torch.memory_format
    forward_model: torch.nn.Module
    autocast_dtype: torch.dtype | None
    scaler: torch.amp.GradScaler | None

    @classmethod
    def set_up(cls, cfg: TrainConfig, model: torch.nn.Module, device: torch.device, rank: int, world: int) -> "Execution":
        if cfg.deterministic:
            # cuBLAS needs a fixed workspace for deterministic GEMMs; set before its first use.
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.benchmark = False
        memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
        if cfg.channels_last:
            model.to(memory_format=torch.channels_last)
        # Every grid is another input size: dynamic shapes avoid one recompilation per grid.
        forward_model = torch.compile(model, dynamic=True) if cfg.compile else model
        dtype = {"32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.precision]
        # fp16 gradients underflow without loss scaling; bf16 has float32's range and needs none.
        scaler = torch.amp.GradScaler(device.type, init_scale=2.0 ** 12) if cfg.precision == "fp16" else None
        return cls(rank, world, device, memory_format, forward_model, dtype, scaler)

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)
