"""Train a DiT: ``python -m minidit.train`` (lesson 06).

One trainer from a 10-minute CPU toy run to ImageNet DiT-XL/2 on many GPUs:

    python -m minidit.train                                     # toy shapes, CPU, minutes
    python -m minidit.train --config cifar10                    # one GPU
    torchrun --nnodes 4 --nproc_per_node 8 ... -m minidit.train --config imagenet256-xl2

What it does each step, for a global batch of G images spread over W processes:

    x_0, y            <- data (toy shapes rendered on the fly, CIFAR-10, an image folder, or VAE latents)
    t, eps, drop, flip <- one generator seeded by (seed, step): the same numbers whatever W is
    (latents stored as posterior moments: also the noise of a fresh posterior sample per image)
    loss = mean(mse + vb) of diffusion.training_losses(model, x_0, t, eps)   (paper §3.1, Improved DDPM §3)
    (--objective flow: t in [0, 1] and the velocity MSE of minidit.flow, vb = 0)
    AdamW step; EMA update (lerp towards the weights)

Randomness is keyed by the step and by each image's position in the global batch, so
a run is reproducible, a resumed run is bit-identical to an uninterrupted one (on CPU),
and W processes with batch b compute what one process with batch W*b computes.
"""

from __future__ import annotations

import copy
import errno
import json
import sys
import time
import warnings
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from . import config, rundir
from .checkpoint import CheckpointError, describe_mismatch, read_file, save_checkpoint
from .data import latent_x0
from .diffusion import GaussianDiffusion, create_diffusion
from .errors import DataError, UserError, run_cli
from .fileio import read_json, write_json, write_text
from .flow import FlowMatching
from .model import DiT, create_model
from .runtime import Dist, autocast_dtype, cpu_threads, dist_from_env, init_distributed, resolve_device, step_generator

CHECKPOINT_VERSION = 1


# --------------------------------------------------------------------------
# Mixed precision (device, processes, threads: minidit.runtime)
# --------------------------------------------------------------------------


def fp32_output(model, device_type: str, dtype: torch.dtype | None):
    """``model`` run under autocast in ``dtype`` with its output cast to float32 (``model`` itself for
    None), so the diffusion computes the losses (MSE and the VB term) in fp32, outside autocast."""
    if dtype is None:
        return model

    def forward(*args, **kwargs) -> torch.Tensor:
        with torch.autocast(device_type, dtype=dtype):
            out = model(*args, **kwargs)
        return out.float()

    return forward


# --------------------------------------------------------------------------
# Data: every image has a fixed position in the global batch of its step
# --------------------------------------------------------------------------


def batch_positions(a: int, micro: int, proc: Dist) -> torch.Tensor:
    """Positions in the global batch of this process's images at micro-step ``a``: [micro].

    Process r holds positions (a * micro + i) * W + r: interleaved, as DistributedSampler
    interleaves the epoch's permutation, so 1 x 2b and 2 x b see the same images."""
    return (a * micro + torch.arange(micro)) * proc.world_size + proc.rank


class ToyBatches:
    """Toy shapes rendered on the fly: image number step * G + position, nothing stored."""

    def __init__(self, cfg: config.TrainConfig, proc: Dist, micro: int, accum: int, start_step: int):
        from . import toy

        self.toy, self.cfg, self.proc, self.micro, self.accum, self.step = toy, cfg, proc, micro, accum, start_step

    def __iter__(self):
        G = self.cfg.global_batch_size
        while True:
            for a in range(self.accum):
                idx = self.step * G + batch_positions(a, self.micro, self.proc)
                yield self.toy.make_batch(idx, seed=self.cfg.seed, image_size=self.cfg.image_size)
            self.step += 1


class RankBatches(torch.utils.data.Sampler):
    """Batch sampler over a map-style dataset: an endless stream of ``DistributedSampler``
    epochs (shuffled with ``seed``, drop_last), cut into micro-batches, starting at
    ``start`` samples into this process's stream (that is how a resumed run skips ahead)."""

    def __init__(self, dataset, proc: Dist, micro: int, seed: int, start: int):
        self.dataset, self.proc, self.micro, self.seed, self.start = dataset, proc, micro, seed, start

    def __iter__(self):
        from torch.utils.data.distributed import DistributedSampler

        W, rank = self.proc.world_size, self.proc.rank
        sampler = DistributedSampler(
            self.dataset, num_replicas=W, rank=rank, shuffle=True, seed=self.seed, drop_last=True
        )
        per_epoch = len(sampler)
        if per_epoch == 0:
            raise DataError(f"the dataset has {len(self.dataset)} images: too few for {W} processes")
        epoch, offset = divmod(self.start, per_epoch)
        batch: list[int] = []
        while True:
            sampler.set_epoch(epoch)
            for i in list(sampler)[offset:]:
                batch.append(i)
                if len(batch) == self.micro:
                    yield batch
                    batch = []
            epoch, offset = epoch + 1, 0


def load_dataset(cfg: config.TrainConfig):
    """The real dataset for ``--data cifar10 | folder | latents`` (see minidit.data)."""
    from . import data

    return data.build_dataset(cfg.data, cfg.data_path, cfg.image_size, root=cfg.data_root)


@dataclass
class DataSpec:
    """What the model is trained on."""

    in_channels: int
    input_size: int
    num_classes: int
    class_names: list[str]
    flip_mode: str = "none"  # none | pixels | stored
    latent: bool = False
    moments: bool = False  # latents stored as posterior moments: a fresh sample per image and step


def describe_data(cfg: config.TrainConfig, dataset) -> DataSpec:
    if cfg.data == "toy":
        from . import toy

        spec = DataSpec(3, cfg.image_size, toy.NUM_CLASSES, list(toy.CLASS_NAMES))
    else:
        spec = DataSpec(
            dataset.in_channels, dataset.input_size, dataset.num_classes, list(dataset.class_names),
            dataset.flip_mode, latent=cfg.data == "latents", moments=getattr(dataset, "moments", False),
        )  # fmt: skip
        if spec.latent:
            dataset.check_sampling(cfg.latent_sampling)
        expected = cfg.image_size // (config.VAE_FACTOR if spec.latent else 1)
        if spec.input_size != expected:
            raise DataError(
                f"{cfg.data_path}: holds {spec.input_size}x{spec.input_size} inputs, "
                f"not {expected} for --image-size {cfg.image_size}"
            )
    if cfg.num_classes is not None and cfg.num_classes != spec.num_classes:
        raise DataError(f"--num-classes {cfg.num_classes}, but the data has {spec.num_classes} classes")
    return spec


def count_line(targets, class_names: list[str], shown: int = 12) -> str:
    """``"1,797 images in 10 classes (0: 178, 1: 182, ...)"``: printed at start-up, so that a class
    folder holding the wrong images (a link to another class, a misplaced copy) shows."""
    counts = torch.bincount(torch.as_tensor(targets, dtype=torch.long), minlength=len(class_names)).tolist()
    parts = [f"{name}: {n:,}" for name, n in zip(class_names[:shown], counts)]
    if len(class_names) > shown:
        parts.append(f"... {len(class_names) - shown} more; smallest {min(counts):,}, largest {max(counts):,}")
    return f"{sum(counts):,} images in {len(class_names)} classes ({', '.join(parts)})"


# --------------------------------------------------------------------------
# Model pieces
# --------------------------------------------------------------------------


def build_model(cfg: config.TrainConfig, spec: DataSpec) -> DiT:
    return create_model(
        cfg.model,
        input_size=spec.input_size, in_channels=spec.in_channels, num_classes=spec.num_classes,
        learn_sigma=cfg.learn_sigma, class_dropout_prob=cfg.class_dropout_prob,
        attn_backend=cfg.attn_backend, grad_checkpointing=cfg.grad_checkpointing,
    )  # fmt: skip


def optimizer_kind(device: torch.device) -> str:
    """The AdamW implementation minidit trains with on ``device``: "fused" on CUDA and CPU (one
    kernel; on a CPU 2-4x faster than torch's default per-tensor loop, and "foreach" is slower
    than that loop there: CPUs have no foreach kernels), "foreach" on other devices."""
    return "fused" if device.type in ("cuda", "cpu") else "foreach"


def make_optimizer(
    params, lr: float, weight_decay: float, device: torch.device, kind: str | None = None
) -> torch.optim.AdamW:
    """minidit's AdamW (shared with ``minidit.bench``): ``kind`` "fused", "foreach" or "plain"
    (the per-tensor loop, as the reference); by default ``optimizer_kind(device)``."""
    kind = kind or optimizer_kind(device)
    flags = {"fused": {"fused": True}, "foreach": {"foreach": True}, "plain": {"foreach": False, "fused": False}}
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, **flags[kind])


@torch.no_grad()
def update_ema(ema: DiT, model: DiT, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, for the trainable weights (one fused call;
    the frozen pos_embed is left alone, unlike the reference)."""
    ema_p = [p for p, q in zip(ema.parameters(), model.parameters()) if q.requires_grad]
    model_p = [q for q in model.parameters() if q.requires_grad]
    torch._foreach_lerp_(ema_p, model_p, 1.0 - decay)


def make_objective(cfg: config.TrainConfig) -> GaussianDiffusion | FlowMatching:
    """What the run trains: the paper's Gaussian diffusion (``--objective ddpm``) or flow matching (``flow``)."""
    if cfg.objective == "flow":
        return FlowMatching(t_sampling=cfg.t_sampling)
    return create_diffusion("", cfg.noise_schedule, cfg.learn_sigma, cfg.diffusion_steps)


def step_noise(cfg: config.TrainConfig, objective, shape: tuple[int, ...], step: int, device, moments: bool = False):
    """Every random number of ``step`` for the whole global batch of ``shape`` [G, C, I, I], from one generator
    keyed by (seed, step), in this order: t [G] (``objective.sample_timesteps``: ddpm one randint, flow one rand or
    randn), noise [G, C, I, I], label drops [G] (long), flips [G] (bool) and, for latents stored as posterior
    moments, the noise of each image's fresh posterior sample (drawn last, so the draws before it stay those of
    runs on frozen latents; None otherwise)."""
    G = shape[0]
    g = step_generator(cfg.seed, step, device)
    t = objective.sample_timesteps(G, g, device)
    noise = torch.randn(shape, generator=g, device=device)
    drop = torch.rand(G, generator=g, device=device) < cfg.class_dropout_prob
    flip = torch.rand(G, generator=g, device=device) < (0.5 if cfg.hflip else 0.0)
    eps_z = torch.randn(shape, generator=g, device=device) if moments else None
    return t, noise, drop.long(), flip, eps_z


def warmup_lr(cfg: config.TrainConfig, step: int) -> float:
    """The learning rate of ``step``: linear warm-up over ``warmup_steps``, then constant (the reference: constant)."""
    w = cfg.warmup_steps
    return cfg.lr * min(1.0, (step + 1) / w) if w > 0 else cfg.lr


def train_step(
    net: nn.Module,
    model: DiT,
    ema: DiT,
    opt: torch.optim.Optimizer,
    diffusion: GaussianDiffusion | FlowMatching,
    micro_batches: Iterable[tuple[torch.Tensor, ...]],
    *,
    accum: int,
    lr: float,
    ema_decay: float,
    amp_dtype: torch.dtype | None = None,
    scaler: torch.amp.GradScaler | None = None,
    grad_clip: float = 0.0,
    ema_update: Callable[[nn.Module, nn.Module, float], None] | None = None,
) -> torch.Tensor:
    """One optimizer step: what ``python -m minidit.train`` runs, and what ``minidit.bench`` times.

    ``micro_batches`` yields ``accum`` tuples (x0 [b, C, I, I], y [b], t [b], noise [b, C, I, I],
    drop [b]) on the device; ``net`` is the module to call (``model`` itself, or ``model`` wrapped by DDP or
    ``torch.compile``). The forward runs under autocast in ``amp_dtype`` (None: fp32), the hybrid loss
    L_simple + L_vlb (section 3.1) in fp32 outside it; gradients are averaged over the micro-batches
    (DDP all-reduces at the last one only), optionally clipped, then AdamW at ``lr`` and the EMA.
    Returns the [3] sums of (loss, mse, vb) over the images, on the device: no host sync.
    """
    device = next(model.parameters()).device
    forward = fp32_output(net, device.type, amp_dtype)
    sums = torch.zeros(3, device=device)
    for group in opt.param_groups:
        group["lr"] = lr
    for a, (x, y, t, noise, drop) in enumerate(micro_batches):
        ctx = net.no_sync() if a < accum - 1 and hasattr(net, "no_sync") else nullcontext()
        with ctx:
            losses = diffusion.training_losses(forward, x, t, model_kwargs=dict(y=y, force_drop_ids=drop), noise=noise)
            loss = losses["loss"].mean() / accum
            (scaler.scale(loss) if scaler else loss).backward()
        sums += torch.stack([losses[k].detach().float().sum() for k in ("loss", "mse", "vb")])
    if scaler is not None:
        scaler.unscale_(opt)
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    if scaler is not None:
        scaler.step(opt)
        scaler.update()
    else:
        opt.step()
    opt.zero_grad(set_to_none=True)
    (ema_update or update_ema)(ema, model, ema_decay)  # default: minidit's fused lerp
    return sums


# --------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------


class NonFiniteLoss(Exception):
    """``what`` ("the loss", or the weights that hold a NaN/inf) became non-finite at ``step``."""

    def __init__(self, step: int, what: str = "the loss"):
        super().__init__(step, what)
        self.step, self.what = step, what


class Trainer:
    def __init__(self, cfg: config.TrainConfig, preset: str):
        self.cfg, self.preset = cfg, preset
        self.device = resolve_device(cfg.device, dist_from_env().local_rank)
        self.proc = init_distributed(self.device)
        self.run_dir = Path(cfg.run_dir or f"runs/{preset}")
        self.ckpt_path = self.run_dir / "checkpoints" / "last.pt"
        self.micro, self.accum = config.batch_layout(cfg, self.proc.world_size)
        self.amp_dtype = autocast_dtype(cfg.precision, self.device)
        self.lock: int | None = None
        self.saved_threads = torch.get_num_threads()
        if self.device.type == "cpu":
            threads, busy = cpu_threads(cfg.num_workers, self.proc.local_world_size)
            torch.set_num_threads(threads)
            if busy and self.proc.is_main:
                warnings.warn(busy, rundir.RunWarning, stacklevel=2)
        if self.device.type == "cuda" and cfg.tf32:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

    # -- bookkeeping -----------------------------------------------------------------

    def log(self, message: str) -> None:
        if self.proc.is_main:
            print(message, flush=True)

    def take_run_dir(self) -> None:
        """Rank 0 locks the run directory before anything in it is read or cleaned (a second trainer on it
        is refused, naming the pid) and checks that it can write there; the other ranks do not write, and
        wait until the lock is held (if rank 0 is refused, torchrun stops them)."""
        if self.proc.is_main:
            self.lock = rundir.lock(self.run_dir)
            for sub in ("checkpoints", "samples"):
                rundir.make_writable_dir(self.run_dir / sub)
        if self.proc.world_size > 1:
            dist.barrier()

    def close(self) -> None:
        """Release the run directory (and the thread setting) at the end of ``main``."""
        rundir.unlock(self.lock)
        self.lock = None
        torch.set_num_threads(self.saved_threads)

    def check_same_run(self, saved: dict[str, Any], source: Path) -> None:
        """Refuse a run directory whose saved config (from config.json or the checkpoint) differs."""
        diff = config.differences(config.to_dict(config.config_from_dict(saved, str(source))), self.cfg)
        if diff:
            raise UserError(
                f"{self.run_dir} belongs to a different config ({'; '.join(diff[:3])}); "
                "pass --run-dir NEW_DIR for a new run, or the same settings to resume"
            )

    def check_run_dir(self) -> dict[str, Any] | None:
        """The checkpoint to resume from (None: a fresh run). Refuses a run directory of another config:
        the config in config.json and the checkpoint's own (which decides when config.json is lost)."""
        saved_cfg = self.run_dir / "config.json"
        if saved_cfg.is_file():
            saved = read_json(saved_cfg, hint="move the run directory aside or pass --run-dir").get("config")
            self.check_same_run(saved, saved_cfg)
        if not self.ckpt_path.is_file():
            return None
        try:
            ckpt = read_file(self.ckpt_path)
        except CheckpointError as e:
            raise UserError(f"cannot resume: {e}") from None
        rundir.check_resumable(ckpt, self.ckpt_path, CHECKPOINT_VERSION)
        self.check_same_run(ckpt.get("config"), self.ckpt_path)
        return ckpt

    def nonfinite_weights(self) -> list[str]:
        """Which of the model, EMA and optimizer state hold a NaN/inf (the same on every process)."""
        opt_state = [v for state in self.opt.state.values() for v in state.values() if torch.is_tensor(v)]
        parts = {"model": [*self.model.state_dict().values()], "EMA": [*self.ema.state_dict().values()],
                 "optimizer state": opt_state}  # fmt: skip
        return rundir.nonfinite_parts(parts)

    def save(self, step: int) -> None:
        """Checkpoint everything a resumed run needs, atomically (rank 0 writes, all wait). Weights with a
        NaN/inf are never written: every process stops with ``NonFiniteLoss``, the last checkpoint stays."""
        broken = self.nonfinite_weights()
        if broken:
            raise NonFiniteLoss(step, f"the weights ({', '.join(broken)})")
        if self.proc.is_main:
            state = {
                "version": CHECKPOINT_VERSION,
                "model": self.model.state_dict(),
                "ema": self.ema.state_dict(),
                "opt": self.opt.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else {},
                "step": step,
                "data_position": {"images_seen": step * self.cfg.global_batch_size},
                "config": config.to_dict(self.cfg),
                "preset": self.preset,
                "class_names": self.spec.class_names,
                "rng": {
                    "cpu": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                },
            }
            try:
                save_checkpoint(state, self.ckpt_path)
                if self.cfg.ckpt_keep_every and step % self.cfg.ckpt_keep_every == 0:
                    save_checkpoint(state, self.ckpt_path.with_name(f"step_{step:07d}.pt"))
            except OSError as e:
                kept = "the previous checkpoint is intact" if self.ckpt_path.is_file() else "no checkpoint was written"
                why = "no space left on device" if e.errno == errno.ENOSPC else e.strerror or str(e)
                raise UserError(f"could not save a checkpoint to {self.ckpt_path.parent} ({why}); {kept}") from None
        if self.proc.world_size > 1:
            dist.barrier()

    # -- setup -----------------------------------------------------------------------

    def prepare(self) -> int:
        cfg = self.cfg
        self.take_run_dir()
        resume = self.check_run_dir()
        self.dataset = None if cfg.data == "toy" else load_dataset(cfg)
        self.spec = describe_data(cfg, self.dataset)
        self.grid_rows = config.sample_classes(cfg, self.spec.num_classes)
        if self.dataset is not None:
            self.log(f"data: {count_line(self.dataset.targets, self.spec.class_names)}")
        if not self.guided:
            self.log("note: --class-dropout-prob 0 trains no null class: sample grids and evaluation are drawn "
                     "without guidance")  # fmt: skip
        if self.spec.latent:
            self.log(f"latents: {self.dataset.describe(flips=cfg.hflip)}")

        torch.manual_seed(cfg.seed)  # the same initial weights on every process
        self.model = build_model(cfg, self.spec).to(self.device)
        self.ema = copy.deepcopy(self.model).requires_grad_(False).eval()
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = make_optimizer(params, lr=cfg.lr, weight_decay=cfg.weight_decay, device=self.device)
        use_scaler = self.amp_dtype == torch.float16
        self.scaler = torch.amp.GradScaler(self.device.type) if use_scaler else None

        start = 0
        if resume is not None:
            for name, module in (("model", self.model), ("ema", self.ema)):
                problem = describe_mismatch(module, resume[name])
                if problem:
                    raise UserError(f"{self.ckpt_path}: {name} does not fit {cfg.model}: {problem}")
                module.load_state_dict(resume[name])
            rundir.load_optimizer(self.opt, resume["opt"], self.ckpt_path)
            if self.scaler is not None and resume.get("scaler"):
                self.scaler.load_state_dict(resume["scaler"])
            torch.set_rng_state(resume["rng"]["cpu"])
            if resume["rng"].get("cuda") and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(resume["rng"]["cuda"])
            start = int(resume["step"])
        # per-process seed for anything not keyed by the step (e.g. DataLoader workers)
        torch.manual_seed(cfg.seed * self.proc.world_size + self.proc.rank)

        net = self.model  # what the step calls: the DiT, wrapped by DDP and torch.compile when asked
        if self.proc.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            net = DDP(net, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.net = torch.compile(net) if cfg.compile else net
        self.diffusion = make_objective(cfg)

        if self.proc.is_main:
            for stale in (self.run_dir / "checkpoints").glob(".*.tmp"):  # left by a kill during a write
                stale.unlink()
            meta = {"config": config.to_dict(cfg), "preset": self.preset, "command": " ".join(sys.argv)}
            write_json(self.run_dir / "config.json", meta)
            self.trim_log(start)
        return start

    def batches(self, start: int):
        """Yields (x, y) micro-batches for this process, from step ``start`` on."""
        if self.dataset is None:
            return iter(ToyBatches(self.cfg, self.proc, self.micro, self.accum, start))
        sampler = RankBatches(self.dataset, self.proc, self.micro, self.cfg.seed, start * self.accum * self.micro)
        workers = self.cfg.num_workers
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_sampler=sampler, num_workers=workers, pin_memory=self.device.type == "cuda",
            persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None,
        )  # fmt: skip
        return iter(loader)

    # -- the loop ----------------------------------------------------------------------

    def step_noise(self, step: int):
        """``step_noise`` (below) for this run's global batch."""
        s = self.spec
        shape = (self.cfg.global_batch_size, s.in_channels, s.input_size, s.input_size)
        return step_noise(self.cfg, self.diffusion, shape, step, self.device, s.moments)

    def lr_at(self, step: int) -> float:
        return warmup_lr(self.cfg, step)

    def train_step(self, step: int, batches) -> torch.Tensor:
        """One optimizer step of the run over ``accum`` micro-batches (``train_step`` below). Returns the
        [3] (loss, mse, vb) sums, on the device (no host sync)."""
        t, noise, drop, flip, eps_z = self.step_noise(step)

        def micro_batches():
            for a in range(self.accum):
                x, y = next(batches)
                x = x.to(self.device, non_blocking=True)
                y = y.to(self.device, non_blocking=True)
                pos = batch_positions(a, self.micro, self.proc).to(self.device)
                if self.spec.flip_mode == "pixels":
                    x = torch.where(flip[pos].view(-1, 1, 1, 1), x.flip(-1), x)
                elif self.spec.latent:  # stored flips, posterior samples: z = (mean + std * eps_z) * 0.18215
                    x = latent_x0(x, flip[pos], None if eps_z is None else eps_z[pos])
                yield x, y, t[pos], noise[pos], drop[pos]

        return train_step(
            self.net, self.model, self.ema, self.opt, self.diffusion, micro_batches(), accum=self.accum,
            lr=self.lr_at(step), ema_decay=self.cfg.ema_decay, amp_dtype=self.amp_dtype, scaler=self.scaler,
            grad_clip=self.cfg.grad_clip,
        )  # fmt: skip

    def run(self) -> int:
        cfg = self.cfg
        start = self.prepare()
        if start >= cfg.max_steps:
            self.log(f"{self.run_dir} already finished {start} steps (--max-steps {cfg.max_steps}); nothing to train.")
            self.log("Pass --max-steps N to train further, or --run-dir NEW_DIR for a new run.")
            self.finish(start, trained=False)
            return 0
        n_params = sum(p.numel() for p in self.model.parameters())
        self.log(
            f"{'resuming' if start else 'training'} {cfg.model} ({n_params / 1e6:.2f}M params) on {cfg.data} "
            f"{self.spec.input_size}x{self.spec.input_size}x{self.spec.in_channels}, {self.device}, "
            f"{self.proc.world_size} process(es), batch {cfg.global_batch_size} = {self.proc.world_size} x {self.micro}"
            f" x {self.accum} accumulation, {str(self.amp_dtype or 'fp32').replace('torch.', '')}, "
            f"step {start} -> {cfg.max_steps}, run dir {self.run_dir}"
        )
        batches = self.batches(start)
        self.model.train()
        bar = None
        if self.proc.is_main:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.max_steps, initial=start, desc="train", dynamic_ncols=True, smoothing=0.1)
        BIG = torch.iinfo(torch.long).max
        window = torch.zeros(3, device=self.device)
        bad = torch.tensor(BIG, device=self.device)
        window_steps, t0 = 0, time.perf_counter()
        try:
            for step in range(start, cfg.max_steps):
                sums = self.train_step(step, batches)
                window += sums
                bad = torch.minimum(bad, torch.where(torch.isfinite(sums).all(), BIG, step))
                window_steps += 1
                done = step + 1
                if done % cfg.log_every == 0 or done == cfg.max_steps:
                    stats = self.reduce(window, bad)
                    if stats["bad"] < BIG:
                        raise NonFiniteLoss(int(stats["bad"]))
                    elapsed = time.perf_counter() - t0
                    ips = window_steps * cfg.global_batch_size / elapsed
                    n = window_steps * cfg.global_batch_size
                    row = dict(step=done, loss=stats["sum"][0] / n, mse=stats["sum"][1] / n, vb=stats["sum"][2] / n,
                               lr=self.lr_at(step), img_per_s=ips, time=time.time())  # fmt: skip
                    self.write_log(row)
                    if bar is not None:
                        bar.set_postfix(loss=f"{row['loss']:.4f}", img_s=f"{ips:.0f}")
                    window.zero_()
                    window_steps, t0 = 0, time.perf_counter()
                if bar is not None:
                    bar.update(1)
                if done % cfg.ckpt_every == 0 or done == cfg.max_steps:
                    first_bad = self.reduce(torch.zeros(3, device=self.device), bad)["bad"]
                    if first_bad < BIG:  # never checkpoint weights that saw a NaN
                        raise NonFiniteLoss(first_bad)
                    self.save(done)
                if cfg.sample_every and done % cfg.sample_every == 0 and done != cfg.max_steps:
                    self.sample_grid(done)
                    self.plot_loss()
                    t0 = time.perf_counter()  # sampling time is not training throughput
        except NonFiniteLoss as e:
            if bar is not None:
                bar.close()
            last = f"{self.ckpt_path} (step {self.saved_step()})" if self.ckpt_path.is_file() else "none written yet"
            self.log(f"error: {e.what} became NaN/inf at step {e.step}; stopped. Last good checkpoint: {last}")
            return 3
        finally:
            if bar is not None:
                bar.close()
        self.finish(cfg.max_steps, trained=True)
        return 0

    def saved_step(self) -> int | str:
        try:
            return int(read_file(self.ckpt_path)["step"])
        except (CheckpointError, KeyError):
            return "?"

    def reduce(self, sums: torch.Tensor, bad: torch.Tensor) -> dict[str, Any]:
        """All-reduce the loss sums (SUM) and the first bad step (MIN) over processes; one host sync."""
        sums, bad = sums.clone(), bad.clone()
        if self.proc.world_size > 1:
            dist.all_reduce(sums, op=dist.ReduceOp.SUM)
            dist.all_reduce(bad, op=dist.ReduceOp.MIN)
        return {"sum": sums.tolist(), "bad": int(bad.item())}

    # -- outputs ---------------------------------------------------------------------

    @property
    def log_path(self) -> Path:
        return self.run_dir / "log.jsonl"

    def write_log(self, row: dict[str, Any]) -> None:
        if self.proc.is_main:
            with open(self.log_path, "a") as f:
                f.write(json.dumps(row) + "\n")

    def trim_log(self, step: int) -> None:
        """On resume, drop log rows past the checkpoint (those steps are trained again), and a torn last line."""
        if self.log_path.is_file():
            keep = [json.dumps(r) + "\n" for r in rundir.read_log(self.log_path) if r["step"] <= step]
            write_text(self.log_path, "".join(keep))

    def plot_loss(self) -> Path | None:
        if not self.proc.is_main or not self.log_path.is_file():
            return None
        from .plots import plot_loss_curve

        rows = rundir.read_log(self.log_path)
        out = self.run_dir / "loss.png"
        plot_loss_curve(rows, out, title=f"{self.cfg.model} on {self.cfg.data}")
        return out

    @property
    def guided(self) -> bool:
        """Whether the model learns the null class that classifier-free guidance needs (label dropout > 0)."""
        return self.cfg.class_dropout_prob > 0

    def guidance_scales(self) -> list[float]:
        """The scales grids and evaluation are drawn with: none (1) and ``cfg_scale``, when the model can be guided."""
        return [1.0, self.cfg.cfg_scale] if self.guided and self.cfg.cfg_scale != 1.0 else [1.0]

    def generate(self, labels: torch.Tensor, cfg_scale: float, seed: int) -> torch.Tensor:
        """EMA samples for ``labels`` [N] -> images [N, 3, H, W] in [-1, 1] (decoded for latent models)."""
        from .sample import generate

        return generate(
            self.ema, labels, cfg_scale=cfg_scale, num_steps=self.cfg.sample_steps, seed=seed,
            noise_schedule=self.cfg.noise_schedule, diffusion_steps=self.cfg.diffusion_steps,
            objective=self.cfg.objective, decoder=self.decoder(), clip_denoised=not self.spec.latent,
            device=self.device,
        )  # fmt: skip

    def decoder(self):
        if not self.spec.latent:
            return None
        if not hasattr(self, "_decoder"):
            from . import vae

            try:
                model = vae.load_vae(self.cfg.vae, device=self.device)
                self._decoder = lambda z: vae.decode(model, z)
            except UserError as e:
                self.log(f"note: sample grids skipped: {e}")
                self._decoder = None
        return self._decoder

    def sample_grid(self, step: int, name: str | None = None) -> Path | None:
        """One row per class from the EMA weights, from the same noise without and with guidance."""
        if not self.proc.is_main or (self.spec.latent and self.decoder() is None):
            return None
        from .plots import save_class_grid

        classes = self.grid_rows
        n = self.cfg.samples_per_class
        labels = torch.tensor(classes).repeat_interleave(n)
        scales = self.guidance_scales()
        seed = self.cfg.seed + 1
        panels = [(f"CFG scale {s:g}" + (" (no guidance)" * (s == 1)), self.generate(labels, s, seed)) for s in scales]
        out = self.run_dir / "samples" / (name or f"step_{step:07d}.png")
        names = [self.spec.class_names[c] for c in classes]
        save_class_grid(panels, names, n, out, title=f"{self.cfg.model}, step {step}, EMA weights")
        return out

    def evaluate_toy(self) -> dict[str, Any]:
        """Sample ``eval_samples`` images (balanced over classes) with and without guidance and
        ask the shipped toy classifier which class each one is."""
        from . import toy

        n = self.cfg.eval_samples
        labels = torch.arange(n) % self.spec.num_classes
        classifier = toy.load_classifier(image_size=self.cfg.image_size)
        result = {}
        for scale in self.guidance_scales():
            images = self.generate(labels, scale, seed=self.cfg.seed + 2)
            pred = toy.classify(images.cpu(), classifier)
            result[f"accuracy_cfg{scale:g}"] = (pred == labels).float().mean().item()
        return result

    def finish(self, step: int, trained: bool) -> None:
        """Final grid, loss curve, evaluation, summary.json, and where everything went."""
        if not self.proc.is_main:
            if self.proc.world_size > 1:
                dist.barrier()
            return
        summary_path = self.run_dir / "summary.json"
        summary = {} if trained else rundir.read_summary(summary_path)
        if trained or not summary:
            grid = self.sample_grid(step, name="final.png")
            curve = self.plot_loss()
            summary = {"step": step, "config": self.preset, "grid": str(grid) if grid else None,
                       "loss_curve": str(curve) if curve else None}  # fmt: skip
            if self.log_path.is_file():
                rows = rundir.read_log(self.log_path)
                if rows:
                    summary["final_loss"] = rows[-1]["loss"]
                    summary["img_per_s"] = sorted(r["img_per_s"] for r in rows)[len(rows) // 2]
            if self.cfg.data == "toy" and self.cfg.eval_samples:
                summary.update(self.evaluate_toy())
            write_json(summary_path, summary)
        print(f"\nrun directory   {self.run_dir}")
        print(f"  checkpoint    {self.ckpt_path}  (model, EMA, optimizer, step {step})")
        print(f"  log           {self.log_path}")
        for key, label in (("loss_curve", "loss curve"), ("grid", "samples")):
            if summary.get(key):
                print(f"  {label:<13} {summary[key]}")
        if "img_per_s" in summary:
            print(f"  throughput    {summary['img_per_s']:.1f} images/s (median over log intervals)")
        scale = f"{self.cfg.cfg_scale:g}"
        if "accuracy_cfg1" in summary:
            guided = f"accuracy_cfg{scale}"
            with_cfg = f"{summary[guided]:.1%} with CFG {scale}, " if guided in summary and scale != "1" else ""
            print(
                f"  sample accuracy (toy classifier, {self.cfg.eval_samples} EMA samples): "
                f"{with_cfg}{summary['accuracy_cfg1']:.1%} without"
            )
        if self.proc.world_size > 1:
            dist.barrier()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        print(config.help_text())
        return 0
    preset, overrides = config.parse_overrides(argv)
    cfg = config.build_config(preset, overrides)
    trainer = Trainer(cfg, preset)
    applied = config.folder_defaults(preset, overrides)
    if applied:
        trainer.log(config.describe_folder_defaults(applied, cfg))
    try:
        return trainer.run()
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        # a log line, a sample grid or the loss plot: the checkpoint writer has its own message
        raise UserError(f"no space left on device ({e.filename or trainer.run_dir}); checkpoints are intact") from None
    finally:
        trainer.close()
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(run_cli(main))
