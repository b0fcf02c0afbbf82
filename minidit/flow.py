"""Flow matching on the linear interpolant (lesson 11): the objective SD3 and Flux train the DiT backbone with.

Rectified flow (Liu et al. 2022) / conditional flow matching (Lipman et al. 2022) with the path of
SD3 (Esser et al. 2024, §2, §3.1) and of SiT's "Linear" interpolant (Ma et al. 2024, §2):

    x_t = (1 - t) x_0 + t eps,   t in [0, 1]   (t = 0: data, t = 1: noise)
    v   = dx_t/dt = eps - x_0                  (the velocity the model learns)
    loss = mean over dims of (v_hat - v)^2     (no VB term: ``vb`` is 0)

Samples follow the ODE dx/dt = v_hat(x, t) from x_1 = eps ~ N(0, I) down to t = 0 (Euler or Heun).

The model is any callable ``model(x_t, 1000 t, **model_kwargs)`` returning [B, C, ...] or, for a DiT
built with ``learn_sigma=True``, [B, 2C, ...] of which only the first C channels (the velocity) are
used: the others get no loss and no gradient. Time reaches the DiT's sinusoidal embedder as ``1000 t``,
the range of the DDPM step index it was designed for, as SD3's and Flux's implementations do (diffusers'
flow-matching scheduler: timestep = 1000 sigma); SiT's released code feeds t in [0, 1] unscaled instead.

Classifier-free guidance (Ho & Salimans 2022) on the velocity, v = v_uncond + s (v_cond - v_uncond):
pass ``partial(dit.forward_with_cfg, guided_channels=None)`` as the model with
``model_kwargs=dict(y=[y, null], cfg_scale=s)`` and a doubled batch [z, z], exactly as for the diffusion
loops, but guide all channels (``None``): the reference's default of 3 is a leftover of eps-prediction
on RGB pixels, and guiding only part of a velocity would mix two different flows.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partialmethod
from typing import Any

import torch

from .diffusion import Generators, Model, initial_noise, mean_flat, with_progress

#: How training draws t: ``uniform`` on [0, 1), or ``logit-normal`` (SD3 §3.1: t = sigmoid(n), n ~ N(m, s^2)).
T_SAMPLINGS = ("uniform", "logit-normal")


def _bcast(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """t [B] -> [B, 1, ..., 1], broadcastable against x [B, ...]."""
    return t.view(-1, *([1] * (x.ndim - 1))).to(x.dtype)


class FlowMatching:
    """The linear-interpolant flow, with the interface of ``GaussianDiffusion`` where the trainer and
    sampler meet it: ``sample_timesteps``, ``training_losses`` and the two sampling loops.

    ``num_timesteps``: the steps N of the sampling loops (t = 1, 1 - 1/N, ..., 0); training t is continuous.
    ``t_sampling``, ``logit_mean`` m, ``logit_std`` s: how ``sample_timesteps`` draws training times.
    ``time_scale``: the model sees ``time_scale * t``.
    """

    def __init__(
        self,
        num_timesteps: int = 50,
        t_sampling: str = "uniform",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        time_scale: float = 1000.0,
    ):
        if t_sampling not in T_SAMPLINGS:
            raise ValueError(f"unknown t sampling {t_sampling!r}; choose one of {T_SAMPLINGS}")
        if num_timesteps < 1:
            raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
        self.num_timesteps, self.t_sampling = num_timesteps, t_sampling
        self.logit_mean, self.logit_std, self.time_scale = logit_mean, logit_std, time_scale

    # -- training -------------------------------------------------------------------------

    def sample_timesteps(self, n: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        """Training times t: [n] float32 in [0, 1), one draw from ``generator`` (``rand`` or ``randn``)."""
        if self.t_sampling == "uniform":
            return torch.rand(n, generator=generator, device=device)
        return torch.sigmoid(self.logit_mean + self.logit_std * torch.randn(n, generator=generator, device=device))

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = (1 - t) x_0 + t eps. x_start, noise: [B, ...], t: [B] in [0, 1]."""
        t = _bcast(t, x_start)
        return (1 - t) * x_start + t * noise

    def velocity(
        self,
        model: Model,
        x: torch.Tensor,
        t: torch.Tensor,
        model_kwargs: dict[str, Any] | None = None,
        clip_denoised: bool = False,
    ) -> torch.Tensor:
        """v_hat(x_t, t): [B, C, ...], the first C channels of ``model(x, time_scale * t)``. x: [B, C, ...], t: [B].

        ``clip_denoised``: clamp x0_hat = x_t - t v_hat to [-1, 1] and return the velocity of the straight line
        from it through x_t, (x_t - x0_hat) / t (at t = 0, v_hat unchanged); Euler is then DDIM's clipped step.
        """
        C = x.shape[1]
        v = model(x, self.time_scale * t, **(model_kwargs or {}))[:, :C]
        if clip_denoised:
            tb = _bcast(t, x)
            x0 = (x - tb * v).clamp(-1, 1)
            v = torch.where(tb > 0, (x - x0) / tb.clamp(min=1e-12), v)
        return v

    def training_losses(
        self,
        model: Model,
        x_start: torch.Tensor,
        t: torch.Tensor,
        model_kwargs: dict[str, Any] | None = None,
        noise: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Per-sample losses [B]: ``loss`` = ``mse`` = mean over dims of (v_hat - (eps - x_0))^2, ``vb`` = 0.
        x_start: [B, C, ...] data, t: [B] in [0, 1] (``sample_timesteps``), noise: eps like x_start."""
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise)
        mse = mean_flat((self.velocity(model, x_t, t, model_kwargs) - (noise - x_start)) ** 2)
        return {"loss": mse, "mse": mse, "vb": torch.zeros_like(mse)}

    # -- sampling -------------------------------------------------------------------------

    def euler_step(self, model, x, t, t_next, model_kwargs=None, clip_denoised=False) -> torch.Tensor:
        """x_{t_next} = x_t + (t_next - t) v_hat(x_t, t). x: [B, ...], t, t_next: [B]."""
        return x + _bcast(t_next - t, x) * self.velocity(model, x, t, model_kwargs, clip_denoised)

    def heun_step(self, model, x, t, t_next, model_kwargs=None, clip_denoised=False) -> torch.Tensor:
        """Heun's method (explicit trapezoid, 2 model calls): the Euler guess x' at t_next, then
        x_{t_next} = x_t + (t_next - t) (v_hat(x_t, t) + v_hat(x', t_next)) / 2."""
        h = _bcast(t_next - t, x)
        v = self.velocity(model, x, t, model_kwargs, clip_denoised)
        v_next = self.velocity(model, x + h * v, t_next, model_kwargs, clip_denoised)
        return x + h * (v + v_next) / 2

    def sample_loop(
        self,
        model: Model,
        shape: Sequence[int],
        noise: torch.Tensor | None = None,
        model_kwargs: dict[str, Any] | None = None,
        progress: bool = False,
        generator: Generators = None,
        device: torch.device | str | None = None,
        clip_denoised: bool = False,
        sampler: str = "euler",
    ) -> torch.Tensor:
        """Solve the ODE from x_1 = ``noise`` (or N(0, I) from ``generator``: one per sample, as the diffusion
        loops) down to x_0: [*shape], with ``sampler`` "euler" (``num_timesteps`` model calls) or "heun" (second
        order, 2 ``num_timesteps`` calls, as SiT's ODE sampler). Deterministic: only x_1 is random."""
        step = {"euler": self.euler_step, "heun": self.heun_step}[sampler]
        x, N = initial_noise(model, shape, noise, generator, device), self.num_timesteps
        for i in with_progress(range(N), progress):  # t = 1 - i/N -> 1 - (i+1)/N
            t = torch.full((shape[0],), 1 - i / N, device=x.device)
            t_next = torch.full((shape[0],), 1 - (i + 1) / N, device=x.device)
            with torch.no_grad():
                x = step(model, x, t, t_next, model_kwargs, clip_denoised)
        return x

    #: ``sample_loop`` with Euler, and with Heun (the names the diffusion's ``p_sample_loop`` goes by).
    euler_sample_loop = partialmethod(sample_loop, sampler="euler")
    heun_sample_loop = partialmethod(sample_loop, sampler="heun")
