"""Gaussian diffusion with a learned variance (lessons 05 and 07).

The DDPM forward process, the "hybrid" training loss of Improved DDPM
(epsilon-MSE plus a variational bound that trains the variance only), ancestral
(DDPM) and DDIM sampling, and respacing to fewer steps. Everything the reference
DiT uses, with its numerics: schedules are computed in float64 and each
per-step coefficient is cast to float32 where it meets a tensor.

Notation: x_0 clean data, x_t noisy, eps noise, beta_t the schedule,
alpha_t = 1 - beta_t, abar_t = prod_{s<=t} alpha_s (``alphas_cumprod``).

The model is any callable ``model(x_t, t, **model_kwargs)`` returning
[B, C, ...] (epsilon) or, with a learned variance, [B, 2C, ...] = (epsilon, v)
with v in [-1, 1] interpolating the log-variance between log beta~_t and
log beta_t. It knows nothing about this module.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch

Model = Callable[..., torch.Tensor]
#: One generator for the batch, or one per sample (the sample's noise then does not depend on its batch).
Generators = torch.Generator | Sequence[torch.Generator] | None


# --------------------------------------------------------------------------
# Schedules and respacing
# --------------------------------------------------------------------------


def get_named_beta_schedule(name: str, num_diffusion_timesteps: int) -> np.ndarray:
    """Betas [T] in float64. ``"linear"``: 1e-4 .. 0.02 scaled by 1000/T (exactly
    those ends for T = 1000). ``"cosine"``: Nichol & Dhariwal's
    abar(t) = cos^2(((t/T) + 0.008) / 1.008 * pi/2), betas capped at 0.999."""
    T = num_diffusion_timesteps
    if name == "linear":
        scale = 1000 / T
        return np.linspace(scale * 0.0001, scale * 0.02, T, dtype=np.float64)
    if name == "cosine":

        def alpha_bar(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        return np.array([min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), 0.999) for i in range(T)], dtype=np.float64)
    raise ValueError(f"unknown noise schedule {name!r}; choose 'linear' or 'cosine'")


def space_timesteps(num_timesteps: int, section_counts: str | Sequence[int]) -> set[int]:
    """The original step indices to keep when sampling with fewer steps.

    ``section_counts`` is a list (or comma-separated string) of step counts, one
    per equal section of [0, num_timesteps): "250" keeps 250 steps spread over the
    whole range, "10,15,20" splits it in three sections with 10, 15 and 20 steps.
    Within a section of ``size`` steps keeping ``n``, the kept indices are
    round(i * (size - 1) / (n - 1)) for i = 0 .. n-1 (a fractional stride, so both
    ends are kept). "ddimN" instead keeps range(0, T, k) for the integer stride k
    that gives exactly N steps (the DDIM paper's striding).
    """
    if isinstance(section_counts, str) and section_counts.startswith("ddim"):
        want = int(section_counts.removeprefix("ddim"))
        strides = [k for k in range(1, num_timesteps) if len(range(0, num_timesteps, k)) == want]
        if not strides:
            raise ValueError(f"cannot create exactly {want} steps with an integer stride")
        return set(range(0, num_timesteps, strides[0]))
    if isinstance(section_counts, str):
        section_counts = [int(part) for part in section_counts.split(",")]
    size_per, extra = divmod(num_timesteps, len(section_counts))
    start, kept = 0, []
    for i, count in enumerate(section_counts):
        size = size_per + int(i < extra)  # the first `extra` sections are one step longer
        if size < count:
            raise ValueError(f"cannot divide a section of {size} steps into {count}")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        cur = 0.0
        for _ in range(count):
            kept.append(start + round(cur))
            cur += stride
        start += size
    return set(kept)


def _extract(arr: torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
    """arr[t] for a float64 table ``arr`` [T], as float32 on t's device, shaped [B, 1, ..., 1]."""
    out = arr.to(t.device)[t].float()
    return out.view(-1, *([1] * (ndim - 1)))


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension but the batch: [B, ...] -> [B]."""
    return x.mean(dim=list(range(1, x.ndim)))


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """Phi(x) ~= 0.5 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), the approximation DDPM uses."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


def discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor) -> torch.Tensor:
    """log-likelihood (nats) of data x in [-1, 1], quantised to 256 levels (bin width 2/255),
    under N(means, exp(log_scales)^2); the two end bins extend to -inf and +inf."""
    d, inv_std = x - means, torch.exp(-log_scales)
    upper = approx_standard_normal_cdf(inv_std * (d + 1.0 / 255.0))  # Phi at the bin's upper edge
    lower = approx_standard_normal_cdf(inv_std * (d - 1.0 / 255.0))  # and at its lower edge

    def log(p: torch.Tensor) -> torch.Tensor:
        return torch.log(p.clamp(min=1e-12))

    # x = -1: the bin reaches down to -inf; x = +1: up to +inf; otherwise Phi(upper) - Phi(lower).
    return torch.where(x < -0.999, log(upper), torch.where(x > 0.999, log(1.0 - lower), log(upper - lower)))


def randn(shape: Sequence[int], generator: Generators, device=None, dtype=None) -> torch.Tensor:
    """N(0, I) of ``shape``. With a list of generators, sample i's noise comes from ``generator[i]``, so it
    does not depend on the batch it is drawn in; a batch of k x len(list) (CFG's [x, x]) repeats it k times."""
    if isinstance(generator, list | tuple):
        z = torch.stack([torch.randn(*shape[1:], generator=g, device=device, dtype=dtype) for g in generator])
        return z.repeat(shape[0] // len(z), *[1] * (len(shape) - 1))
    return torch.randn(*shape, generator=generator, device=device, dtype=dtype)


def initial_noise(model: Model, shape: Sequence[int], noise: torch.Tensor | None, generator: Generators, device=None):
    """Where a sampling loop starts: ``noise`` if given, else N(0, I) of ``shape`` from ``generator`` on
    ``device`` (default: the model's, or the CPU for a plain function)."""
    if noise is not None:
        return noise
    if device is None:
        device = next(model.parameters()).device if isinstance(model, torch.nn.Module) else torch.device("cpu")
    return randn(shape, generator, device)


def with_progress(steps: Iterable[int], progress: bool) -> Iterable[int]:
    """``steps``, behind a tqdm bar when ``progress``."""
    if not progress:
        return steps
    from tqdm.auto import tqdm

    return tqdm(steps, desc="sampling", leave=False)


# --------------------------------------------------------------------------
# The diffusion process
# --------------------------------------------------------------------------


class GaussianDiffusion:
    """A discrete Gaussian diffusion with epsilon prediction.

    ``betas``: float64 [S]. ``learn_sigma``: the model outputs (epsilon, v) and
    the variance is learned in the range [beta~_t, beta_t]; otherwise it is fixed
    to beta_t (the "fixed large" choice; beta~_1 at t = 0).
    ``timestep_map``: for a respaced process, the original step index of each of
    the S kept steps; the model is always called with original indices.
    """

    def __init__(self, betas: np.ndarray, learn_sigma: bool = True, timestep_map: Sequence[int] | None = None):
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or not ((betas > 0) & (betas <= 1)).all():
            raise ValueError("betas must be a 1-D array in (0, 1]")
        self.learn_sigma = learn_sigma
        self.num_timesteps = len(betas)
        self.timestep_map = torch.tensor(
            list(range(self.num_timesteps)) if timestep_map is None else list(timestep_map), dtype=torch.long
        )

        alphas = 1.0 - betas
        abar = np.cumprod(alphas)
        abar_prev = np.append(1.0, abar[:-1])
        # beta~_t = beta_t (1 - abar_{t-1}) / (1 - abar_t): the posterior q(x_{t-1} | x_t, x_0) variance.
        post_var = betas * (1.0 - abar_prev) / (1.0 - abar)
        tables = {
            "betas": betas,
            "alphas_cumprod": abar,
            "alphas_cumprod_prev": abar_prev,
            "sqrt_alphas_cumprod": np.sqrt(abar),
            "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - abar),
            "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / abar),
            "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / abar - 1),
            "posterior_variance": post_var,
            # beta~_0 = 0, so the log is clipped by using beta~_1 at t = 0.
            "posterior_log_variance_clipped": np.log(np.append(post_var[1], post_var[1:])),
            "posterior_mean_coef1": betas * np.sqrt(abar_prev) / (1.0 - abar),
            "posterior_mean_coef2": (1.0 - abar_prev) * np.sqrt(alphas) / (1.0 - abar),
        }
        for name, value in tables.items():
            setattr(self, name, torch.from_numpy(value))

    def sample_timesteps(self, n: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        """Training timesteps, uniform over the steps: [n] long in 0 .. num_timesteps - 1 (one ``randint``)."""
        return torch.randint(0, self.num_timesteps, (n,), generator=generator, device=device)

    # -- forward process ------------------------------------------------------------

    def q_mean_variance(
        self, x_start: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean, variance and log-variance of q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I)."""
        mean = _extract(self.sqrt_alphas_cumprod, t, x_start.ndim) * x_start
        var = _extract(1.0 - self.alphas_cumprod, t, x_start.ndim)
        log_var = _extract(torch.log(1.0 - self.alphas_cumprod), t, x_start.ndim)
        return mean, var, log_var

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Sample x_t ~ q(x_t | x_0): sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps. x_start: [B, ...], t: [B]."""
        if noise is None:
            noise = torch.randn_like(x_start)
        return (
            _extract(self.sqrt_alphas_cumprod, t, x_start.ndim) * x_start
            + _extract(self.sqrt_one_minus_alphas_cumprod, t, x_start.ndim) * noise
        )

    def q_posterior_mean_variance(
        self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q(x_{t-1} | x_t, x_0) = N(coef1 x_0 + coef2 x_t, beta~_t): mean, variance, clipped log-variance."""
        n = x_start.ndim
        mean = _extract(self.posterior_mean_coef1, t, n) * x_start + _extract(self.posterior_mean_coef2, t, n) * x_t
        return mean, _extract(self.posterior_variance, t, n), _extract(self.posterior_log_variance_clipped, t, n)

    # -- the model's reverse step ---------------------------------------------------------

    def _model_t(self, t: torch.Tensor) -> torch.Tensor:
        """The original step index the model sees for the (possibly respaced) step t."""
        return self.timestep_map.to(t.device)[t]

    def p_mean_variance(
        self,
        model: Model,
        x: torch.Tensor,
        t: torch.Tensor,
        model_kwargs: dict[str, Any] | None = None,
        clip_denoised: bool = False,
        model_output: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """p(x_{t-1} | x_t): ``mean``, ``variance``, ``log_variance``, ``pred_xstart`` (all [B, C, ...]).

        pred_xstart = sqrt(1/abar_t) x_t - sqrt(1/abar_t - 1) eps; the mean is the
        posterior mean at that x_0. With a learned variance,
        log sigma^2 = frac log beta_t + (1 - frac) log beta~_t, frac = (v + 1) / 2.
        ``model_output`` skips the model call (used by the VB term).
        """
        model_kwargs = model_kwargs or {}
        B, C = x.shape[:2]
        if model_output is None:
            model_output = model(x, self._model_t(t), **model_kwargs)
        n = x.ndim
        if self.learn_sigma:
            if model_output.shape[1] != 2 * C:
                raise ValueError(f"learn_sigma expects {2 * C} output channels, got {model_output.shape[1]}")
            eps, v = torch.split(model_output, C, dim=1)
            min_log = _extract(self.posterior_log_variance_clipped, t, n)
            max_log = _extract(torch.log(self.betas), t, n)
            frac = (v + 1) / 2
            log_variance = frac * max_log + (1 - frac) * min_log
            variance = torch.exp(log_variance)
        else:
            eps = model_output
            # "fixed large": beta_t, with beta~_1 at t = 0 for a better decoder likelihood.
            fixed = torch.cat([self.posterior_variance[1:2], self.betas[1:]])
            variance = _extract(fixed, t, n).expand_as(x)
            log_variance = _extract(torch.log(fixed), t, n).expand_as(x)

        pred_xstart = (
            _extract(self.sqrt_recip_alphas_cumprod, t, n) * x - _extract(self.sqrt_recipm1_alphas_cumprod, t, n) * eps
        )
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)
        return {
            "mean": mean,
            "variance": variance,
            "log_variance": log_variance,
            "pred_xstart": pred_xstart,
            "eps": eps,
        }

    # -- training --------------------------------------------------------------------------

    def _vb_terms_bpd(
        self, model_output: torch.Tensor, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        """The variational-bound term L_t in bits per dimension, [B]: KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t))
        for t > 0, and the discretised decoder NLL -log p(x_0 | x_1) at t = 0."""
        true_mean, _, true_log_var = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self.p_mean_variance(None, x_t, t, model_output=model_output)
        kl = mean_flat(normal_kl(true_mean, true_log_var, out["mean"], out["log_variance"])) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x_start, out["mean"], 0.5 * out["log_variance"])
        nll = mean_flat(nll) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    def training_losses(
        self,
        model: Model,
        x_start: torch.Tensor,
        t: torch.Tensor,
        model_kwargs: dict[str, Any] | None = None,
        noise: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Per-sample losses for a batch: ``loss`` = ``mse`` + ``vb`` (each [B]).

        mse = mean over dims of (eps_hat - eps)^2. With a learned variance, vb is
        the VB term in bits with the predicted *mean* detached (epsilon stops the
        gradient), so it trains only the variance: Improved DDPM's hybrid loss,
        with no rescaling. Without a learned variance, vb is 0.
        """
        model_kwargs = model_kwargs or {}
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise=noise)
        model_output = model(x_t, self._model_t(t), **model_kwargs)
        C = x_start.shape[1]
        if self.learn_sigma:
            eps, v = torch.split(model_output, C, dim=1)
            vb = self._vb_terms_bpd(torch.cat([eps.detach(), v], dim=1), x_start, x_t, t)
        else:
            eps, vb = model_output, torch.zeros(x_start.shape[0], device=x_start.device)
        mse = mean_flat((noise - eps) ** 2)
        return {"loss": mse + vb, "mse": mse, "vb": vb}

    # -- sampling -------------------------------------------------------------------------

    def _randn(self, shape, like: torch.Tensor | None, generator: Generators, device, dtype=None):
        """N(0, I) of ``shape``, as ``randn``; with no generator, like ``like``."""
        if generator is None and like is not None:
            return torch.randn_like(like)
        return randn(shape, generator, device, dtype)

    def p_sample(
        self,
        model: Model,
        x: torch.Tensor,
        t: torch.Tensor,
        model_kwargs: dict[str, Any] | None = None,
        clip_denoised: bool = False,
        generator: Generators = None,
    ) -> dict[str, torch.Tensor]:
        """One ancestral step x_t -> x_{t-1} = mean + sigma z (no noise at t = 0)."""
        out = self.p_mean_variance(model, x, t, model_kwargs=model_kwargs, clip_denoised=clip_denoised)
        noise = self._randn(x.shape, x, generator, x.device, x.dtype)
        nonzero = (t != 0).float().view(-1, *([1] * (x.ndim - 1)))
        sample = out["mean"] + nonzero * torch.exp(0.5 * out["log_variance"]) * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def ddim_sample(
        self,
        model: Model,
        x: torch.Tensor,
        t: torch.Tensor,
        model_kwargs: dict[str, Any] | None = None,
        clip_denoised: bool = False,
        eta: float = 0.0,
        generator: Generators = None,
    ) -> dict[str, torch.Tensor]:
        """One DDIM step: x_{t-1} = sqrt(abar_{t-1}) x0_hat + sqrt(1 - abar_{t-1} - s^2) eps_hat + s z,
        s = eta sqrt((1 - abar_{t-1}) / (1 - abar_t)) sqrt(1 - abar_t / abar_{t-1})."""
        out = self.p_mean_variance(model, x, t, model_kwargs=model_kwargs, clip_denoised=clip_denoised)
        n = x.ndim
        # epsilon implied by the (possibly clipped) x_0 prediction
        eps = (_extract(self.sqrt_recip_alphas_cumprod, t, n) * x - out["pred_xstart"]) / _extract(
            self.sqrt_recipm1_alphas_cumprod, t, n
        )
        abar = _extract(self.alphas_cumprod, t, n)
        abar_prev = _extract(self.alphas_cumprod_prev, t, n)
        sigma = eta * torch.sqrt((1 - abar_prev) / (1 - abar)) * torch.sqrt(1 - abar / abar_prev)
        mean = out["pred_xstart"] * torch.sqrt(abar_prev) + torch.sqrt(1 - abar_prev - sigma**2) * eps
        noise = self._randn(x.shape, x, generator, x.device, x.dtype)
        nonzero = (t != 0).float().view(-1, *([1] * (n - 1)))
        return {"sample": mean + nonzero * sigma * noise, "pred_xstart": out["pred_xstart"]}

    def _loop(self, step, model, shape, noise, model_kwargs, progress, generator, device, **kw) -> torch.Tensor:
        img = initial_noise(model, shape, noise, generator, device)
        for i in with_progress(range(self.num_timesteps - 1, -1, -1), progress):
            t = torch.full((shape[0],), i, device=img.device, dtype=torch.long)
            with torch.no_grad():
                img = step(model, img, t, model_kwargs=model_kwargs, generator=generator, **kw)["sample"]
        return img

    def p_sample_loop(
        self,
        model: Model,
        shape: Sequence[int],
        noise: torch.Tensor | None = None,
        model_kwargs: dict[str, Any] | None = None,
        progress: bool = False,
        generator: Generators = None,
        device: torch.device | str | None = None,
        clip_denoised: bool = False,
    ) -> torch.Tensor:
        """Ancestral (DDPM) sampling from x_T = ``noise`` (or fresh N(0, I)) down to x_0: [*shape].

        ``model`` may be ``dit.forward_with_cfg`` with ``model_kwargs=dict(y=..., cfg_scale=...)``.
        ``clip_denoised`` clamps x0_hat to [-1, 1]: useful for pixels, off for latents.
        """
        return self._loop(
            self.p_sample, model, shape, noise, model_kwargs, progress, generator, device, clip_denoised=clip_denoised
        )

    def ddim_sample_loop(
        self,
        model: Model,
        shape: Sequence[int],
        noise: torch.Tensor | None = None,
        model_kwargs: dict[str, Any] | None = None,
        progress: bool = False,
        generator: Generators = None,
        device: torch.device | str | None = None,
        clip_denoised: bool = False,
        eta: float = 0.0,
    ) -> torch.Tensor:
        """DDIM sampling (deterministic for ``eta=0``) from x_T down to x_0: [*shape]."""
        return self._loop(
            self.ddim_sample,
            model,
            shape,
            noise,
            model_kwargs,
            progress,
            generator,
            device,
            clip_denoised=clip_denoised,
            eta=eta,
        )


def respace_betas(betas: np.ndarray, use_timesteps: Iterable[int]) -> tuple[np.ndarray, list[int]]:
    """Betas of the process that visits only ``use_timesteps``, keeping abar at those steps:
    beta'_k = 1 - abar_{t_k} / abar_{t_{k-1}}. Returns (new betas, the kept original indices)."""
    keep = set(use_timesteps)
    abar = np.cumprod(1.0 - np.asarray(betas, dtype=np.float64))
    last, new_betas, timestep_map = 1.0, [], []
    for i, ab in enumerate(abar):
        if i in keep:
            new_betas.append(1 - ab / last)
            last = ab
            timestep_map.append(i)
    return np.array(new_betas), timestep_map


def create_diffusion(
    timestep_respacing: str | Sequence[int] | None = "",
    noise_schedule: str = "linear",
    learn_sigma: bool = True,
    diffusion_steps: int = 1000,
) -> GaussianDiffusion:
    """The DiT diffusion: ``create_diffusion("")`` for training (1000 steps), ``"250"`` for
    the paper's sampler, ``"ddim50"`` or ``"50"`` for fast sampling, or a list of section counts."""
    betas = get_named_beta_schedule(noise_schedule, diffusion_steps)
    keep = space_timesteps(diffusion_steps, timestep_respacing) if timestep_respacing else range(diffusion_steps)
    new_betas, timestep_map = respace_betas(betas, keep)
    return GaussianDiffusion(new_betas, learn_sigma=learn_sigma, timestep_map=timestep_map)
