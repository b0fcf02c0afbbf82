"""Diffusion against hand derivations (float64 numpy / math), not against minidit itself.

The expected values are derived from the DDPM / Improved-DDPM equations:
the posterior by Gaussian conditioning (Bayes), the KL of two Gaussians, the
discretised decoder likelihood, DDIM's update, and respacing by its rule.
"""

import math
from fractions import Fraction

import numpy as np
import pytest
import torch

import minidit
from minidit.diffusion import create_diffusion, space_timesteps

T = 1000


def linear_betas() -> np.ndarray:
    return np.array([1e-4 + (0.02 - 1e-4) * i / (T - 1) for i in range(T)])


def abar_of(betas, t) -> float:
    return math.prod(1 - b for b in betas[: t + 1])


def posterior_by_bayes(betas, t, x0, xt):
    """q(x_{t-1} | x_t, x_0) from q(x_{t-1} | x_0) = N(sqrt(abar') x0, 1 - abar') and
    q(x_t | x_{t-1}) = N(sqrt(alpha) x_{t-1}, beta): precision-weighted combination."""
    beta = betas[t]
    alpha = 1 - beta
    abar_prev = abar_of(betas, t - 1) if t > 0 else 1.0
    if t == 0:  # x_{-1} := x_0 exactly: zero variance
        return x0, 0.0
    prec = 1 / (1 - abar_prev) + alpha / beta
    var = 1 / prec
    mean = var * (math.sqrt(abar_prev) * x0 / (1 - abar_prev) + math.sqrt(alpha) * xt / beta)
    return mean, var


def constant_model(eps: np.ndarray, v: np.ndarray | None):
    """A 'model' that ignores its input and returns fixed (eps, v); records the t it saw."""
    seen = []

    def model(x, t, **kwargs):
        seen.append(t.clone())
        out = torch.from_numpy(eps).float().expand(x.shape[0], *eps.shape[1:]).clone()
        if v is not None:
            out = torch.cat([out, torch.from_numpy(v).float().expand(x.shape[0], *v.shape[1:])], dim=1)
        return out

    model.seen = seen
    return model


# --------------------------------------------------------------------------
# Schedules
# --------------------------------------------------------------------------


def test_linear_schedule_is_1e4_to_002():
    d = create_diffusion()
    np.testing.assert_allclose(d.betas.numpy(), linear_betas(), rtol=0, atol=1e-15)
    # (like the reference, the 1000-step process is built through respacing, which recomputes
    # betas from abar: equal to ~1e-13 relative, not bit for bit)
    assert d.betas[0].item() == pytest.approx(1e-4, rel=1e-12) and d.betas[-1].item() == pytest.approx(0.02, rel=1e-12)
    assert d.alphas_cumprod[-1].item() == pytest.approx(abar_of(linear_betas(), T - 1), rel=1e-12)


def test_linear_schedule_scales_with_steps():
    d = create_diffusion(diffusion_steps=100)
    assert d.betas[0].item() == pytest.approx(1e-3) and d.betas[-1].item() == pytest.approx(0.2)


def test_cosine_schedule_follows_its_alpha_bar():
    d = create_diffusion(noise_schedule="cosine")
    f = lambda s: math.cos((s / T + 0.008) / 1.008 * math.pi / 2) ** 2
    for t in (0, 10, 500, 990):
        assert d.alphas_cumprod[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-9)
    assert d.betas.max().item() == pytest.approx(0.999)  # clipped at the end


def test_unknown_schedule_is_an_error():
    with pytest.raises(ValueError, match="cosine"):
        create_diffusion(noise_schedule="sigmoid")


# --------------------------------------------------------------------------
# Forward process and posterior
# --------------------------------------------------------------------------


def test_q_sample():
    d = create_diffusion()
    x0, noise = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    t = torch.tensor([0, 250, 999])
    xt = d.q_sample(x0, t, noise)
    betas = linear_betas()
    for i, step in enumerate(t.tolist()):
        ab = abar_of(betas, step)
        expected = math.sqrt(ab) * x0[i].double() + math.sqrt(1 - ab) * noise[i].double()
        torch.testing.assert_close(xt[i].double(), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("step", [1, 2, 100, 999])
def test_posterior_equals_bayes(step):
    d = create_diffusion()
    betas = linear_betas()
    x0, xt = torch.tensor([[0.3, -1.2]]), torch.tensor([[0.9, 0.1]])
    mean, var, logvar = d.q_posterior_mean_variance(x0, xt, torch.tensor([step]))
    for j in range(2):
        m, v = posterior_by_bayes(betas, step, x0[0, j].item(), xt[0, j].item())
        assert mean[0, j].item() == pytest.approx(m, abs=1e-5)
        assert var.flatten()[0].item() == pytest.approx(v, rel=1e-5)
        assert logvar.flatten()[0].item() == pytest.approx(math.log(v), abs=1e-5)


def test_posterior_log_variance_is_clipped_at_zero():
    d = create_diffusion()
    _, v1 = posterior_by_bayes(linear_betas(), 1, 0.0, 0.0)
    _, var0, logvar0 = d.q_posterior_mean_variance(torch.zeros(1, 1), torch.zeros(1, 1), torch.tensor([0]))
    assert var0.item() == 0.0
    assert logvar0.item() == pytest.approx(math.log(v1), abs=1e-5)  # log beta~_1 stands in for log 0


@pytest.mark.parametrize("step", [0, 7, 600])
def test_p_mean_variance_learned_range(step):
    d = create_diffusion()
    betas = linear_betas()
    rng = np.random.default_rng(step)
    eps = rng.normal(size=(1, 2, 2, 2))
    v = rng.uniform(-1, 1, size=(1, 2, 2, 2))
    x = torch.from_numpy(rng.normal(size=(1, 2, 2, 2))).float()
    out = d.p_mean_variance(constant_model(eps, v), x, torch.tensor([step]))
    ab = abar_of(betas, step)
    _, post_var = posterior_by_bayes(betas, max(step, 1), 0.0, 0.0)  # beta~_t, with beta~_1 at t = 0
    for idx in np.ndindex(1, 2, 2, 2):
        xv = x[idx].item()
        x0 = (xv - math.sqrt(1 - ab) * eps[idx]) / math.sqrt(ab)
        frac = (v[idx] + 1) / 2
        logvar = frac * math.log(betas[step]) + (1 - frac) * math.log(post_var)
        mean = posterior_by_bayes(betas, step, x0, xv)[0]
        assert out["pred_xstart"][idx].item() == pytest.approx(x0, abs=1e-4, rel=1e-5)
        assert out["log_variance"][idx].item() == pytest.approx(logvar, abs=1e-5)
        assert out["variance"][idx].item() == pytest.approx(math.exp(logvar), rel=1e-5)
        assert out["mean"][idx].item() == pytest.approx(mean, abs=1e-5)


def test_fixed_variance_without_learned_sigma():
    d = create_diffusion(learn_sigma=False)
    out = d.p_mean_variance(constant_model(np.zeros((1, 1, 1, 1)), None), torch.zeros(1, 1, 1, 1), torch.tensor([10]))
    assert out["variance"].item() == pytest.approx(linear_betas()[10], rel=1e-6)


# --------------------------------------------------------------------------
# The hybrid loss
# --------------------------------------------------------------------------


def approx_cdf(x):
    return 0.5 * (1 + math.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def decoder_nll_nats(x0, mean, logvar):
    """-log of the probability of x0's 8-bit bin under N(mean, e^logvar); end bins open."""
    s = math.exp(-0.5 * logvar)
    if x0 < -0.999:
        p = approx_cdf(s * (x0 - mean + 1 / 255))
    elif x0 > 0.999:
        p = 1 - approx_cdf(s * (x0 - mean - 1 / 255))
    else:
        p = approx_cdf(s * (x0 - mean + 1 / 255)) - approx_cdf(s * (x0 - mean - 1 / 255))
    return -math.log(max(p, 1e-12))


@pytest.mark.parametrize("step", [0, 1, 321, 999])
def test_training_losses_by_hand(step):
    d = create_diffusion()
    betas = linear_betas()
    rng = np.random.default_rng(100 + step)
    shape = (1, 2, 2, 2)
    eps_hat, v = rng.normal(size=shape), rng.uniform(-1, 1, size=shape)
    x0 = rng.uniform(-1, 1, size=shape)
    x0[0, 0, 0, 0], x0[0, 1, 1, 1] = -1.0, 1.0  # exercise both open end bins at t = 0
    noise = rng.normal(size=shape)
    t = torch.tensor([step])
    losses = d.training_losses(
        constant_model(eps_hat, v), torch.from_numpy(x0).float(), t, noise=torch.from_numpy(noise).float()
    )

    ab = abar_of(betas, step)
    mse = np.mean((eps_hat - noise) ** 2)
    _, bt_tilde = posterior_by_bayes(betas, max(step, 1), 0.0, 0.0)
    terms = []
    for idx in np.ndindex(*shape):
        xt = math.sqrt(ab) * x0[idx] + math.sqrt(1 - ab) * noise[idx]
        x0_hat = (xt - math.sqrt(1 - ab) * eps_hat[idx]) / math.sqrt(ab)
        frac = (v[idx] + 1) / 2
        logvar = frac * math.log(betas[step]) + (1 - frac) * math.log(bt_tilde)
        model_mean = posterior_by_bayes(betas, step, x0_hat, xt)[0] if step > 0 else x0_hat
        if step == 0:
            terms.append(decoder_nll_nats(x0[idx], model_mean, logvar))
        else:
            true_mean, true_var = posterior_by_bayes(betas, step, x0[idx], xt)
            # KL(N(m1, v1) || N(m2, v2)) = 1/2 (log v2/v1 + v1/v2 + (m1 - m2)^2 / v2 - 1)
            kl = 0.5 * (logvar - math.log(true_var) + true_var / math.exp(logvar))
            kl += 0.5 * ((true_mean - model_mean) ** 2 / math.exp(logvar) - 1)
            terms.append(kl)
    vb_bits = np.mean(terms) / math.log(2)
    assert losses["mse"].item() == pytest.approx(mse, abs=1e-5)
    assert losses["vb"].item() == pytest.approx(vb_bits, abs=1e-5, rel=1e-5)
    assert losses["loss"].item() == pytest.approx(mse + vb_bits, abs=1e-5, rel=1e-5)
    assert all(losses[k].shape == (1,) for k in ("loss", "mse", "vb"))


def test_vb_trains_only_the_variance_and_mse_only_epsilon():
    d = create_diffusion()
    out = torch.nn.Parameter(torch.randn(4, 4, 2, 2) * 0.1)
    model = lambda x, t, **kw: out * 1.0
    x0 = torch.rand(4, 2, 2, 2) * 2 - 1
    t = torch.tensor([0, 3, 400, 999])
    losses = d.training_losses(model, x0, t)
    (g_vb,) = torch.autograd.grad(losses["vb"].sum(), out, retain_graph=True)
    (g_mse,) = torch.autograd.grad(losses["mse"].sum(), out)
    assert torch.count_nonzero(g_vb[:, :2]) == 0 and torch.count_nonzero(g_vb[:, 2:]) > 0
    assert torch.count_nonzero(g_mse[:, 2:]) == 0 and torch.count_nonzero(g_mse[:, :2]) > 0


def test_losses_without_learned_sigma_have_zero_vb():
    d = create_diffusion(learn_sigma=False)
    losses = d.training_losses(lambda x, t, **kw: torch.zeros_like(x), torch.zeros(2, 1, 2, 2), torch.tensor([1, 2]))
    assert torch.equal(losses["vb"], torch.zeros(2))
    assert losses["mse"].shape == (2,) and losses["mse"].min() > 0


def test_training_losses_pass_model_kwargs():
    d = create_diffusion()
    got = {}

    def model(x, t, y):
        got["y"] = y
        return torch.zeros(x.shape[0], 2 * x.shape[1], *x.shape[2:])

    d.training_losses(model, torch.zeros(2, 1, 2, 2), torch.tensor([1, 2]), model_kwargs={"y": torch.tensor([5, 6])})
    assert got["y"].tolist() == [5, 6]


# --------------------------------------------------------------------------
# Respacing
# --------------------------------------------------------------------------


def spaced_by_rule(num_steps: int, counts: list[int]) -> set[int]:
    """Independent statement of the rule with exact fractions: split [0, T) into len(counts)
    sections (the first T % len(counts) one step longer); in a section of `size` steps keeping
    n, keep start + round(i * (size - 1) / (n - 1)) (round half to even), i = 0..n-1."""
    out, start = set(), 0
    for i, n in enumerate(counts):
        size = num_steps // len(counts) + (1 if i < num_steps % len(counts) else 0)
        for j in range(n):
            out.add(start + (0 if n == 1 else round(Fraction(j * (size - 1), n - 1))))
        start += size
    return out


@pytest.mark.parametrize(
    "spec,counts",
    [("250", [250]), ("50", [50]), ("100", [100]), ("25", [25]), ("10,15,20", [10, 15, 20]), ("1", [1])],
)
def test_respacing_index_sets(spec, counts):
    assert space_timesteps(T, spec) == spaced_by_rule(T, counts)
    assert len(space_timesteps(T, spec)) == sum(counts)


def test_respacing_small_cases_by_hand():
    assert space_timesteps(10, "4") == {0, 3, 6, 9}
    assert space_timesteps(10, "3") == {0, 4, 9}  # stride 4.5: round(4.5) = 4
    # A tie: the 15-step section [100, 200) has stride 99/14, and its 8th index is 100 + 49.5 exactly.
    # The reference accumulates the stride in floating point, reaching 49.4999..., so it keeps 149
    # where exact arithmetic would round half to even (150); we keep the reference's index set.
    spaced = space_timesteps(300, [10, 15, 20])
    assert 149 in spaced and 150 not in spaced
    assert spaced ^ spaced_by_rule(300, [10, 15, 20]) == {149, 150}
    assert space_timesteps(T, "ddim50") == set(range(0, T, 20))
    assert space_timesteps(T, "ddim25") == set(range(0, T, 40))
    assert {0, 999} <= space_timesteps(T, "250")
    with pytest.raises(ValueError):
        space_timesteps(T, "ddim999")  # strides 1 and 2 give 1000 and 500 steps: nothing gives 999
    with pytest.raises(ValueError):
        space_timesteps(10, "11")


def test_respaced_process_keeps_alpha_bar_and_feeds_original_steps():
    full, spaced = create_diffusion(""), create_diffusion("250")
    kept = sorted(space_timesteps(T, "250"))
    assert spaced.num_timesteps == 250
    assert spaced.timestep_map.tolist() == kept
    np.testing.assert_allclose(spaced.alphas_cumprod.numpy(), full.alphas_cumprod.numpy()[kept], rtol=1e-12)
    # beta'_k = 1 - abar(t_k) / abar(t_{k-1})
    ab = full.alphas_cumprod.numpy()
    assert spaced.betas[5].item() == pytest.approx(1 - ab[kept[5]] / ab[kept[4]], rel=1e-12)

    model = constant_model(np.zeros((1, 1, 1, 1)), np.zeros((1, 1, 1, 1)))
    spaced.p_sample_loop(model, (2, 1, 1, 1), noise=torch.zeros(2, 1, 1, 1))
    seen = [s[0].item() for s in model.seen]
    assert seen == kept[::-1]  # the model is fed the original indices, from 999 down to 0


# --------------------------------------------------------------------------
# Samplers
# --------------------------------------------------------------------------


def oracle_for_point_mass(diffusion, c: float):
    """The exact epsilon-predictor when every training image equals c."""
    ab = {int(t): diffusion.alphas_cumprod[i].item() for i, t in enumerate(diffusion.timestep_map)}

    def model(x, t, **kw):
        a = torch.tensor([ab[int(s)] for s in t]).view(-1, 1, 1, 1)
        eps = (x - a.sqrt() * c) / (1 - a).sqrt()
        return torch.cat([eps, torch.zeros_like(eps)], dim=1)

    return model


@pytest.mark.parametrize("spec", ["", "50"])
def test_ddpm_loop_recovers_a_point_mass(spec):
    d = create_diffusion(spec)
    g = torch.Generator().manual_seed(0)
    x = d.p_sample_loop(oracle_for_point_mass(d, 0.7), (4, 1, 2, 2), generator=g)
    torch.testing.assert_close(x, torch.full_like(x, 0.7), atol=1e-3, rtol=0)


def test_ddim_loop_recovers_a_point_mass_deterministically():
    d = create_diffusion("ddim25")
    noise = torch.randn(3, 1, 2, 2)
    a = d.ddim_sample_loop(oracle_for_point_mass(d, -0.4), noise.shape, noise=noise)
    b = d.ddim_sample_loop(oracle_for_point_mass(d, -0.4), noise.shape, noise=noise)
    assert torch.equal(a, b)
    torch.testing.assert_close(a, torch.full_like(a, -0.4), atol=1e-4, rtol=0)


def test_one_ddim_step_by_hand():
    d = create_diffusion("ddim50")
    eps = np.full((1, 1, 1, 1), 0.3)
    x = torch.tensor([[[[0.5]]]])
    k = 20  # respaced index; original step 400
    out = d.ddim_sample(constant_model(eps, np.zeros_like(eps)), x, torch.tensor([k]))
    betas = linear_betas()
    ab, ab_prev = abar_of(betas, 400), abar_of(betas, 380)
    x0 = (0.5 - math.sqrt(1 - ab) * 0.3) / math.sqrt(ab)
    expected = math.sqrt(ab_prev) * x0 + math.sqrt(1 - ab_prev) * 0.3
    assert out["sample"].item() == pytest.approx(expected, abs=1e-5)


def test_one_ddpm_step_by_hand():
    d = create_diffusion()
    eps, v = np.full((1, 1, 1, 1), -0.2), np.full((1, 1, 1, 1), 0.5)
    g = torch.Generator().manual_seed(3)
    z = torch.randn(1, 1, 1, 1, generator=torch.Generator().manual_seed(3))
    out = d.p_sample(constant_model(eps, v), torch.tensor([[[[1.1]]]]), torch.tensor([50]), generator=g)
    betas = linear_betas()
    ab = abar_of(betas, 50)
    x0 = (1.1 - math.sqrt(1 - ab) * -0.2) / math.sqrt(ab)
    mean, post_var = posterior_by_bayes(betas, 50, x0, 1.1)
    logvar = 0.75 * math.log(betas[50]) + 0.25 * math.log(post_var)
    assert out["sample"].item() == pytest.approx(mean + math.exp(0.5 * logvar) * z.item(), abs=1e-5)


def test_sampling_with_cfg_model_and_generator_is_reproducible(small_dit):
    d = create_diffusion("10")
    y = torch.tensor([1, 2, 10, 10])

    def run(seed):
        g = torch.Generator().manual_seed(seed)
        z = torch.randn(2, 4, 8, 8, generator=g)
        return d.p_sample_loop(
            small_dit.forward_with_cfg, (4, 4, 8, 8), noise=torch.cat([z, z]),
            model_kwargs=dict(y=y, cfg_scale=4.0), generator=g, progress=True,
        )  # fmt: skip

    a, b, c = run(0), run(0), run(1)
    assert a.shape == (4, 4, 8, 8) and torch.isfinite(a).all()
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_create_diffusion_api():
    d = minidit.create_diffusion(timestep_respacing="", noise_schedule="linear", learn_sigma=True, diffusion_steps=1000)
    assert isinstance(d, minidit.GaussianDiffusion) and d.num_timesteps == 1000


def test_per_sample_generators_make_a_sample_independent_of_its_batch():
    """A list of generators gives sample i its own noise at every step: sampled alone or in a batch of
    three (and in CFG's doubled batch, whose halves share it), sample 1 comes out the same."""
    diffusion = create_diffusion("5")
    model = lambda x, t, **kw: torch.cat([0.1 * x, torch.zeros_like(x)], dim=1)  # noqa: E731 - a stand-in eps model
    gens = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731
    shape = (1, 2, 4, 4)
    alone = diffusion.p_sample_loop(model, shape, generator=gens([11]))
    batch = diffusion.p_sample_loop(model, (3, 2, 4, 4), generator=gens([10, 11, 12]))
    doubled = diffusion.p_sample_loop(model, (6, 2, 4, 4), generator=gens([10, 11, 12]))
    assert torch.equal(batch[1:2], alone) and torch.equal(doubled[1:2], alone) and torch.equal(doubled[4:5], alone)
    assert not torch.equal(batch[0:1], alone)
    one = diffusion.p_sample_loop(model, (3, 2, 4, 4), generator=torch.Generator().manual_seed(11))
    assert not torch.equal(one[1:2], alone)  # one generator for the batch: noise depends on the position
