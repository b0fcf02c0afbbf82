"""Where a command runs: the device, the processes of a ``torchrun`` launch, CPU threads, precision, seeds.

Every entry point (``train``, ``sample``, ``evaluate``, ``extract_latents``, ``bench``) picks its device
with :func:`resolve_device` and joins a ``torchrun`` launch with :func:`init_distributed`; the random
generators that make runs reproducible are keyed here, once:

    step_generator(seed, step)          the trainer's t, noise, label drops and flips of one step
    sample_generator(seed, index)       every draw of sample ``index`` (x_T and each step's noise)
    shard_generator(seed, shard)        the frozen posterior samples of one latents shard

A generator keyed by (seed, position) gives the same numbers whatever the batch size, the number of
processes, or where a run was interrupted and resumed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from .errors import UserError

# --------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------


@dataclass
class Dist:
    """Who this process is: global rank, rank on its node, the number of processes (all, and on this node)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_from_env() -> Dist:
    """This process, from the variables ``torchrun`` sets (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``,
    ``LOCAL_WORLD_SIZE``); one process of one without them."""
    env = os.environ
    return Dist(
        int(env.get("RANK", "0")), int(env.get("LOCAL_RANK", "0")), int(env.get("WORLD_SIZE", "1")),
        int(env.get("LOCAL_WORLD_SIZE", "1")),
    )  # fmt: skip


def resolve_device(name: str | torch.device = "auto", local_rank: int = 0) -> torch.device:
    """``--device``: auto (``cuda:local_rank`` if there is a CUDA GPU, else Apple's MPS, else the CPU), cpu,
    cuda (``cuda:local_rank``), cuda:N or mps. A device that is not here is one ``UserError`` line.

    The GPU of a process is its *local* rank, its number on its own machine (the reference used the
    global rank, which names a GPU that does not exist on a second machine)."""
    name = str(name)
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank)
        return torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"--device {name!r}: use auto, cpu, cuda, cuda:N or mps")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: no CUDA GPU is visible here (use --device cpu)")
        device = torch.device("cuda", local_rank if device.index is None else device.index)
        if device.index >= torch.cuda.device_count():
            raise UserError(f"--device {device}: this machine has {torch.cuda.device_count()} GPU(s)")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {name}: this machine has no Apple GPU (MPS) (use --device cpu)")
    return device


def init_distributed(device: torch.device) -> Dist:
    """Make ``device`` this process's CUDA device and, under ``torchrun`` (WORLD_SIZE > 1), join the
    process group (NCCL between GPUs, Gloo otherwise) unless it is joined already. Returns this process."""
    import torch.distributed as dist

    proc = dist_from_env()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if proc.world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return proc


# --------------------------------------------------------------------------
# CPU threads and precision
# --------------------------------------------------------------------------


def available_cpus() -> int:
    """The CPU cores this process may run on: its affinity mask (a container's or ``taskset``'s limit),
    which can be far fewer than the machine's ``os.cpu_count()``."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def cpu_threads(num_workers: int, local_processes: int) -> tuple[int, str | None]:
    """Intra-op threads for a process working on the CPU, and a warning line for a busy machine (or None).

    The available cores are shared by this node's processes and their DataLoader workers:
    ``(cores - workers) // processes``, at least 1 (torch's default, one thread per core of the machine,
    oversubscribes the cores whenever something else runs). If the 1-minute load average already fills
    the cores, threads that wait for each other at every operation crawl (48 instead of 900 images/s
    measured in training): use one thread and say so. ``OMP_NUM_THREADS``, when set, is the user's choice."""
    cores = available_cpus()
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads(), None
    threads = max(1, (cores - num_workers) // max(1, local_processes))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if load < cores or threads == 1:
        return threads, None
    return 1, (
        f"the machine is busy (load average {load:.1f} on {cores} cores): training with 1 thread instead of "
        f"{threads}, so it does not fight the other processes; it is slower than on an idle machine. "
        "Set OMP_NUM_THREADS=N to choose"
    )


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """``--precision`` (auto, fp32, bf16, fp16) -> the autocast dtype: None for fp32; with auto, bf16 where
    the GPU has it, fp16 (with a GradScaler) on older GPUs, fp32 off CUDA."""
    if precision == "auto":
        if device.type != "cuda":
            return None
        precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


# --------------------------------------------------------------------------
# Keyed generators: the same numbers whatever the batching, the processes or a resume
# --------------------------------------------------------------------------


def step_generator(seed: int, step: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The trainer's generator of training step ``step``: seeded with ``seed * 1_000_003 + step``, so a resumed
    run draws what an uninterrupted one draws, and W processes draw the whole global batch's numbers alike."""
    return torch.Generator(device).manual_seed(seed * 1_000_003 + step)


def sample_generator(seed: int, index: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The generator of sample ``index``'s noise: seeded with a hash of (seed, index) (numpy's
    ``SeedSequence``), so that no two samples share noise, whatever batch or process draws them."""
    state = np.random.SeedSequence([seed, index]).generate_state(1, np.uint64)[0]
    return torch.Generator(device).manual_seed(int(state))


def shard_generator(seed: int, shard: int) -> torch.Generator:
    """The CPU generator for latents shard ``shard``'s posterior noise, seeded from (seed, shard) via a hash,
    so neighbouring seeds and shards get unrelated streams."""
    mixed = np.random.SeedSequence([seed, shard]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(mixed[0]) << 32 | int(mixed[1]))
