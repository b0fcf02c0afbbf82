"""minidit against the reference DiT release, bit for bit (opt-in).

Point ``MINIDIT_REFERENCE_DIT`` at a checkout of the reference code
(https://github.com/facebookresearch/DiT; its ``models.py`` imports ``timm``) and run

    MINIDIT_REFERENCE_DIT=/path/to/DiT python -m pytest tests/test_reference.py

Without the variable every test here is skipped (without timm, those that build the reference
model). Nothing of the reference is in this repository: it is imported from that checkout,
under private module names. Every
comparison is ``torch.equal``: initial weights under one seed, the forward pass (eval and
training-mode label dropout), ``forward_with_cfg``, ``training_losses`` and their
gradients, respacing (index sets and every table), ``p_mean_variance``, and DDPM and
DDIM sampling loops with guidance.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch
from conftest import perturbed

import minidit
from minidit.diffusion import create_diffusion, space_timesteps

ENV = "MINIDIT_REFERENCE_DIT"

# (zoo name or None for the DiT class itself, constructor kwargs): small inputs keep each model cheap on a CPU.
SMALL = dict(input_size=8, patch_size=2, hidden_size=64, depth=2, num_heads=4, num_classes=10)
CONFIGS = [
    ("DiT-S/2", dict(input_size=8, num_classes=10)),
    ("DiT-S/8", dict(input_size=16)),
    (
        None,
        dict(
            input_size=12,
            patch_size=4,
            in_channels=3,
            hidden_size=96,
            depth=3,
            num_heads=3,
            num_classes=7,
            learn_sigma=False,
            class_dropout_prob=0.2,
        ),
    ),  # fmt: skip
    (None, dict(SMALL, class_dropout_prob=0.0)),  # no null row
]
IDS = ["S2", "S8", "custom", "no-null"]


def _load(name: str, path: Path, package_dir: Path | None = None):
    spec = importlib.util.spec_from_file_location(
        name, path, submodule_search_locations=[str(package_dir)] if package_dir else None
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def ref():
    root = os.environ.get(ENV)
    if not root:
        pytest.skip(f"set {ENV}=/path/to/a/checkout/of/facebookresearch/DiT to compare with the reference release")
    root = Path(root).expanduser()
    if not (root / "models.py").is_file() or not (root / "diffusion" / "__init__.py").is_file():
        pytest.fail(f"{ENV}={root}: not a checkout of the reference DiT (expected models.py and diffusion/)")
    return Reference(root)


class Reference:
    """The checkout's ``diffusion`` package, and its ``models`` module when a test needs it (it imports timm)."""

    def __init__(self, root: Path):
        self.root = root
        self.diffusion = _load("_dit_reference_diffusion", root / "diffusion" / "__init__.py", root / "diffusion")

    @functools.cached_property
    def models(self):
        pytest.importorskip("timm", reason=f"the reference models.py ({ENV}) imports timm: pip install timm")
        return _load("_dit_reference_models", self.root / "models.py")


def build_pair(ref, name: str | None, kwargs: dict, seed: int = 0):
    """The reference model and minidit's, each built right after ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    theirs = ref.models.DiT_models[name](**kwargs) if name else ref.models.DiT(**kwargs)
    torch.manual_seed(seed)
    ours = minidit.DiT_models[name](**kwargs) if name else minidit.DiT(**kwargs)
    return theirs, ours


def perturbed_pair(ref, name: str | None = None, kwargs: dict = SMALL):
    """Both models with the same perturbed weights (a fresh DiT outputs zeros: adaLN-Zero)."""
    theirs, ours = build_pair(ref, name, kwargs)
    perturbed(ours, std=0.05)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    return theirs, ours


def inputs(model, batch: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    S, C, K = model.input_size, model.in_channels, model.num_classes
    x = torch.randn(batch, C, S, S, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    null = model.y_embedder.dropout_prob > 0
    y = torch.randint(0, K + int(null), (batch,), generator=g)  # K: the null label, where there is one
    return x, t, y


def assert_same_dicts(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# --------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------


@pytest.mark.parametrize("name,kwargs", CONFIGS, ids=IDS)
def test_initial_weights_under_one_seed(ref, name, kwargs):
    theirs, ours = build_pair(ref, name, kwargs, seed=1234)
    assert_same_dicts(theirs.state_dict(), ours.state_dict())
    assert [n for n, p in theirs.named_parameters() if not p.requires_grad] == ["pos_embed"]
    assert [n for n, p in ours.named_parameters() if not p.requires_grad] == ["pos_embed"]


@pytest.mark.parametrize("name,kwargs", CONFIGS, ids=IDS)
def test_forward(ref, name, kwargs):
    theirs, ours = perturbed_pair(ref, name, kwargs)
    x, t, y = inputs(ours, 4)
    with torch.no_grad():
        expected = theirs.eval()(x, t, y)
        assert expected.abs().max() > 0
        assert torch.equal(ours.eval()(x, t, y), expected)  # sdpa: timm's fused attention

        for block in theirs.blocks:  # timm's explicit softmax path against minidit's "math" backend
            block.attn.fused_attn = False
        assert torch.equal(ours.set_attn_backend("math")(x, t, y), theirs(x, t, y))


@pytest.mark.parametrize("name,kwargs", CONFIGS[:3:2], ids=IDS[:3:2])
def test_training_mode_label_dropout_under_one_seed(ref, name, kwargs):
    theirs, ours = perturbed_pair(ref, name, kwargs)
    x, t, y = inputs(ours, 64)
    y = y.clamp(max=ours.num_classes - 1)
    with torch.no_grad():
        torch.manual_seed(7)
        expected = theirs.train()(x, t, y)
        torch.manual_seed(7)
        got = ours.train()(x, t, y)
        uncond = ours.eval()(x, t, torch.full_like(y, ours.num_classes))
    assert torch.equal(got, expected)
    dropped = [i for i in range(len(y)) if torch.equal(got[i], uncond[i])]
    assert 0 < len(dropped) < len(y)  # some labels were dropped under this seed, not all


@pytest.mark.parametrize("name,kwargs", CONFIGS[:2], ids=IDS[:2])
@pytest.mark.parametrize("scale", [1.5, 4.0])
def test_forward_with_cfg(ref, name, kwargs, scale):
    theirs, ours = perturbed_pair(ref, name, kwargs)
    x, t, y = inputs(ours, 3)
    K = ours.num_classes
    x, t = torch.cat([x, x]), torch.cat([t, t])
    y = torch.cat([y.clamp(max=K - 1), torch.full_like(y, K)])
    with torch.no_grad():
        expected = theirs.eval().forward_with_cfg(x, t, y, scale)
        assert torch.equal(ours.eval().forward_with_cfg(x, t, y, scale), expected)


# --------------------------------------------------------------------------
# The diffusion
# --------------------------------------------------------------------------

SCHEDULES = {"linear": "linear", "cosine": "squaredcos_cap_v2"}  # minidit's name -> the reference's
TABLES = [
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_variance",
    "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
]  # fmt: skip


def diffusion_pair(ref, spec: str, schedule: str = "linear", learn_sigma: bool = True):
    theirs = ref.diffusion.create_diffusion(spec, noise_schedule=SCHEDULES[schedule], learn_sigma=learn_sigma)
    return theirs, create_diffusion(spec, noise_schedule=schedule, learn_sigma=learn_sigma)


@pytest.mark.parametrize(
    "steps,spec",
    [(1000, s) for s in ("250", "100", "50", "27", "25", "10", "1", "10,15,20", "5,0,7", "ddim50", "ddim25", "ddim10")]
    + [(300, "10,15,20"), (1000, [3, 50, 7]), (4000, "250")],
)
def test_respacing_index_sets(ref, steps, spec):
    assert space_timesteps(steps, spec) == ref.diffusion.space_timesteps(steps, spec)


@pytest.mark.parametrize("spec", ["", "250", "ddim50", "10,15,20"])
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_respaced_tables_and_timestep_map(ref, spec, schedule):
    theirs, ours = diffusion_pair(ref, spec, schedule)
    assert ours.num_timesteps == theirs.num_timesteps
    assert ours.timestep_map.tolist() == list(theirs.timestep_map)
    for name in TABLES:
        assert torch.equal(getattr(ours, name), torch.from_numpy(getattr(theirs, name))), name


@pytest.mark.parametrize("spec", ["", "250"])
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("learn_sigma", [True, False])
def test_training_losses_and_their_gradients(ref, spec, schedule, learn_sigma):
    theirs_m, ours_m = perturbed_pair(ref, None, dict(SMALL, learn_sigma=learn_sigma))
    theirs_d, ours_d = diffusion_pair(ref, spec, schedule, learn_sigma)
    x, _, y = inputs(ours_m, 8)
    y = y.clamp(max=ours_m.num_classes - 1)
    g = torch.Generator().manual_seed(3)
    t = torch.cat(
        [torch.tensor([0, 1, ours_d.num_timesteps - 1]), torch.randint(0, ours_d.num_timesteps, (5,), generator=g)]
    )
    noise = torch.randn(x.shape, generator=g)

    def run(diffusion, model):
        torch.manual_seed(11)  # training mode: the label drops are drawn inside the forward pass
        losses = diffusion.training_losses(model.train(), x, t, model_kwargs=dict(y=y), noise=noise)
        model.zero_grad()
        losses["loss"].mean().backward()
        return losses, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    (expected, expected_grads), (got, grads) = run(theirs_d, theirs_m), run(ours_d, ours_m)
    for key in ("loss", "mse") + (("vb",) if learn_sigma else ()):
        assert torch.equal(got[key].detach(), expected[key].detach()), key
    assert expected["loss"].min() > 0
    assert_same_dicts(grads, expected_grads)


@pytest.mark.parametrize("spec", ["", "250", "ddim25"])
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("clip", [False, True])
def test_p_mean_variance(ref, spec, schedule, clip):
    theirs_m, ours_m = perturbed_pair(ref)
    theirs_d, ours_d = diffusion_pair(ref, spec, schedule)
    x, _, y = inputs(ours_m, 6)
    t = torch.tensor([0, 1, 2, ours_d.num_timesteps // 2, ours_d.num_timesteps - 2, ours_d.num_timesteps - 1])
    with torch.no_grad():
        expected = theirs_d.p_mean_variance(theirs_m.eval(), x, t, clip_denoised=clip, model_kwargs=dict(y=y))
        got = ours_d.p_mean_variance(ours_m.eval(), x, t, clip_denoised=clip, model_kwargs=dict(y=y))
    for key in ("mean", "variance", "log_variance", "pred_xstart"):
        assert torch.equal(got[key], expected[key]), key


@pytest.mark.parametrize("sampler,spec", [("ddpm", "25"), ("ddim", "ddim10")])
def test_sampling_loops_with_guidance(ref, sampler, spec):
    theirs_m, ours_m = perturbed_pair(ref)
    theirs_d, ours_d = diffusion_pair(ref, spec)
    z, _, y = inputs(ours_m, 3)
    K = ours_m.num_classes
    z, y = torch.cat([z, z]), torch.cat([y.clamp(max=K - 1), torch.full_like(y, K)])
    kw = dict(y=y, cfg_scale=4.0)

    def run(diffusion, model):
        loop = diffusion.p_sample_loop if sampler == "ddpm" else diffusion.ddim_sample_loop
        torch.manual_seed(5)  # the per-step noise of both comes from the global generator
        return loop(model.eval().forward_with_cfg, z.shape, z, clip_denoised=False, model_kwargs=kw, device="cpu")

    expected = run(theirs_d, theirs_m)
    assert torch.equal(run(ours_d, ours_m), expected)
    assert not torch.equal(expected, z)
