"""minidit.runtime: one device choice, the torchrun environment, CPU threads, and the keyed generators."""

import os

import numpy as np
import pytest
import torch

from minidit import runtime
from minidit.errors import UserError

# --------------------------------------------------------------------------
# Devices
# --------------------------------------------------------------------------


def test_cpu_is_the_cpu():
    assert runtime.resolve_device("cpu") == torch.device("cpu")
    assert runtime.resolve_device(torch.device("cpu")) == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available() or torch.backends.mps.is_available(), reason="an accelerator is here")
def test_auto_on_a_machine_without_accelerator_is_the_cpu():
    assert runtime.resolve_device() == torch.device("cpu")
    assert runtime.resolve_device("auto", local_rank=3) == torch.device("cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU here")
def test_auto_and_cuda_take_the_local_rank():  # pragma: no cover - GPU machines only
    assert runtime.resolve_device("auto") == torch.device("cuda", 0)
    assert runtime.resolve_device("cuda", local_rank=0) == torch.device("cuda", 0)


@pytest.mark.parametrize("name", ["gpu", "meta", "cuda:x", ""])
def test_a_bad_name_is_one_line(name):
    with pytest.raises(UserError, match=r"^--device .*: use auto, cpu, cuda, cuda:N or mps$") as e:
        runtime.resolve_device(name)
    assert "\n" not in str(e.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="there is a GPU here")
@pytest.mark.parametrize("name", ["cuda", "cuda:1"])
def test_cuda_without_a_gpu_is_one_line(name):
    with pytest.raises(UserError, match=rf"^--device {name}: no CUDA GPU is visible here \(use --device cpu\)$"):
        runtime.resolve_device(name)


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="this machine has an Apple GPU")
def test_mps_without_one_is_one_line():
    with pytest.raises(UserError, match=r"^--device mps: this machine has no Apple GPU \(MPS\)"):
        runtime.resolve_device("mps")


# --------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------


def test_dist_from_env_reads_what_torchrun_sets(monkeypatch):
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    alone = runtime.dist_from_env()
    assert (alone.rank, alone.local_rank, alone.world_size, alone.local_world_size) == (0, 0, 1, 1) and alone.is_main
    monkeypatch.setenv("RANK", "9")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "16")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    proc = runtime.dist_from_env()
    assert (proc.rank, proc.local_rank, proc.world_size, proc.local_world_size) == (9, 1, 16, 8)
    assert not proc.is_main


def test_init_distributed_alone_starts_no_process_group(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    proc = runtime.init_distributed(torch.device("cpu"))
    assert proc.world_size == 1
    assert not (torch.distributed.is_available() and torch.distributed.is_initialized())


# --------------------------------------------------------------------------
# CPU threads and precision
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cores,load,workers,processes,expected,warns",
    [
        (8, 0.5, 0, 1, 8, False),  # the affinity mask, not the machine's 64 cores
        (8, 0.5, 2, 1, 6, False),  # DataLoader workers get their cores
        (8, 0.5, 0, 2, 4, False),  # two training processes on the node share them
        (8, 9.0, 0, 1, 1, True),  # a busy machine: one thread, and a warning that says so
        (1, 5.0, 0, 1, 1, False),  # one core: nothing to lower, nothing to say
    ],
)
def test_cpu_threads_never_oversubscribe(cores, load, workers, processes, expected, warns, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(os, "getloadavg", lambda: (load, load, load))
    threads, warning = runtime.cpu_threads(workers, processes)
    assert threads == expected
    assert (warning is not None) == warns
    if warns:
        assert f"load average {load:.1f} on {cores} cores" in warning and "OMP_NUM_THREADS" in warning


def test_cpu_threads_respect_omp_num_threads(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    monkeypatch.setattr(os, "getloadavg", lambda: (99.0, 99.0, 99.0))
    assert runtime.cpu_threads(0, 1) == (torch.get_num_threads(), None)


def test_autocast_dtype():
    cpu = torch.device("cpu")
    assert runtime.autocast_dtype("auto", cpu) is None and runtime.autocast_dtype("fp32", cpu) is None
    assert runtime.autocast_dtype("bf16", cpu) is torch.bfloat16
    assert runtime.autocast_dtype("fp16", cpu) is torch.float16


# --------------------------------------------------------------------------
# Keyed generators: moved, not changed (resume and the shipped toy checkpoint depend on their numbers)
# --------------------------------------------------------------------------


@pytest.mark.parametrize("seed,step", [(0, 0), (0, 1), (7, 3), (1, 0)])
def test_step_generator_is_the_trainers_old_formula(seed, step):
    old = torch.Generator("cpu").manual_seed(seed * 1_000_003 + step)
    new = runtime.step_generator(seed, step)
    assert torch.equal(torch.randn(5, generator=new), torch.randn(5, generator=old))


def test_step_generator_first_draws_are_pinned():
    assert torch.randint(0, 1000, (4,), generator=runtime.step_generator(7, 3)).tolist() == [822, 836, 735, 526]


@pytest.mark.parametrize("seed,index", [(0, 0), (0, 1), (5, 11), (123, 49_999)])
def test_sample_generator_is_the_samplers_old_formula(seed, index):
    state = np.random.SeedSequence([seed, index]).generate_state(1, np.uint64)[0]
    old = torch.Generator("cpu").manual_seed(int(state))
    assert torch.equal(torch.randn(5, generator=runtime.sample_generator(seed, index)), torch.randn(5, generator=old))


def test_sample_generator_first_draws_are_pinned_and_still_in_minidit_sample():
    from minidit.sample import sample_generator

    assert sample_generator is runtime.sample_generator
    draws = torch.rand(3, generator=runtime.sample_generator(5, 11)).tolist()
    assert draws == pytest.approx([0.08906114101409912, 0.06078559160232544, 0.04541701078414917], abs=0)


@pytest.mark.parametrize("seed,shard", [(0, 0), (0, 1), (5, 2)])
def test_shard_generator_is_the_extractors_old_formula(seed, shard):
    mixed = np.random.SeedSequence([seed, shard]).generate_state(2, dtype=np.uint32)
    old = torch.Generator().manual_seed(int(mixed[0]) << 32 | int(mixed[1]))
    assert torch.equal(torch.randn(5, generator=runtime.shard_generator(seed, shard)), torch.randn(5, generator=old))


def test_shard_generator_first_draws_are_pinned():
    draws = torch.rand(3, generator=runtime.shard_generator(5, 2)).tolist()
    assert draws == pytest.approx([0.44074547290802, 0.11031389236450195, 0.9448307156562805], abs=0)
