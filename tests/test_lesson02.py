"""The checks of lesson 02 are real: the right answers pass, stubs fail, and plausible mistakes are
rejected with a hint that names them."""

import math

import pytest
import torch
from torch import nn

from minidit.course import lesson02

# --------------------------------------------------------------------------
# 2.1 (timestep_embedding)
# --------------------------------------------------------------------------


def _embedding(t, dim=256, max_period=10000.0, *, denom=None, cos_first=True, interleave=False, t_scale=1.0):
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / (denom or half))
    args = (t.float() * t_scale)[:, None] * freqs[None]
    a, b = (torch.cos(args), torch.sin(args)) if cos_first else (torch.sin(args), torch.cos(args))
    if interleave:
        return torch.stack([a, b], dim=-1).reshape(len(t), 2 * half)
    return torch.cat([a, b], dim=-1)


def timestep_embedding(t, dim=256, max_period=10000.0):
    return _embedding(t, dim, max_period)


def timestep_embedding_float64(t, dim=256, max_period=10000.0):  # a different, equally right computation
    half = dim // 2
    freqs = max_period ** (-torch.arange(half, dtype=torch.float64) / half)
    args = t.double()[:, None] * freqs
    return torch.cat([args.cos(), args.sin()], dim=-1).float()


def timestep_embedding_unsqueeze_(t, dim=256, max_period=10000.0):  # t.unsqueeze_ changes the caller's tensor
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    args = t.unsqueeze_(1).float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def stub(*args, **kwargs):
    raise NotImplementedError("Exercise: replace this line with your code")


TIMESTEP_MISTAKES = {
    "sin first": (lambda t, dim=256, max_period=10000.0: _embedding(t, dim, max_period, cos_first=False),
                  "you put sin first"),
    "half - 1 (diffusers)": (lambda t, dim=256, max_period=10000.0: _embedding(t, dim, max_period, denom=dim // 2 - 1),
                             "divides by half - 1"),
    "t rescaled to [0, 1]": (lambda t, dim=256, max_period=10000.0: _embedding(t, dim, max_period, t_scale=1e-3),
                             "you rescaled t to [0, 1]"),
    "interleaved": (lambda t, dim=256, max_period=10000.0: _embedding(t, dim, max_period, interleave=True),
                    "you interleaved cos and sin"),
    "divided by dim": (lambda t, dim=256, max_period=10000.0: _embedding(t, dim, max_period, denom=dim),
                       "divides by dim"),
    "max_period ignored": (lambda t, dim=256, max_period=10000.0: _embedding(t, dim, 10000.0),
                           "you ignored the max_period argument"),
    "only cos": (lambda t, dim=256, max_period=10000.0: _embedding(t, dim, max_period)[:, : dim // 2],
                 "that is half the width"),
    "float64 result": (lambda t, dim=256, max_period=10000.0: _embedding(t, dim, max_period).double(),
                       "expected torch.float32"),
    "max_period = 1000 (the number of steps)": (lambda t, dim=256, max_period=10000.0: _embedding(t, dim, 1000.0),
                                                "a period of 1000"),
    "numpy array": (lambda t, dim=256, max_period=10000.0: _embedding(t, dim, max_period).numpy(),
                    "should be a torch.Tensor"),
    "t unsqueezed in place": (timestep_embedding_unsqueeze_, "changed its input t in place"),
}  # fmt: skip


@pytest.mark.parametrize("fn", [timestep_embedding, timestep_embedding_float64])
def test_timestep_embedding_right_answers_pass(fn, capsys):
    lesson02.check_timestep_embedding(fn)
    assert capsys.readouterr().out == "✅ Exercise 2.1 (timestep_embedding) passed\n"


def test_timestep_embedding_stub_fails():
    with pytest.raises(AssertionError, match=r"Exercise 2\.1 \(timestep_embedding\): not implemented yet"):
        lesson02.check_timestep_embedding(stub)


@pytest.mark.parametrize("name", TIMESTEP_MISTAKES)
def test_timestep_embedding_mistakes_are_named(name):
    fn, hint = TIMESTEP_MISTAKES[name]
    with pytest.raises(AssertionError, match=r"Exercise 2\.1 \(timestep_embedding\)") as err:
        lesson02.check_timestep_embedding(fn)
    assert hint in str(err.value), str(err.value)


def test_timestep_embedding_failure_states_the_tolerance_it_applies():
    """The message names the atol and rtol the check really uses (not a made-up '< 1e-4')."""
    with pytest.raises(AssertionError) as err:
        lesson02.check_timestep_embedding(TIMESTEP_MISTAKES["sin first"][0])
    assert "atol=0.002, rtol=0.0001" in str(err.value), str(err.value)


# --------------------------------------------------------------------------
# 2.2 (label_dropout)
# --------------------------------------------------------------------------


def label_dropout(labels, num_classes, dropout_prob, train, force_drop_ids=None, *, null=None, eval_drop=False,
                  invert=False, force_in_eval=True, combine=False):  # fmt: skip
    """The right answer, or with one mistake switched on."""
    null = num_classes if null is None else null
    B = labels.shape[0]
    if force_drop_ids is not None and (train or force_in_eval):
        drop = force_drop_ids == 1
        if combine and train:
            drop = drop | (torch.rand(B) < dropout_prob)
    elif (train or eval_drop) and dropout_prob > 0:
        coins = torch.rand(B)
        drop = coins >= dropout_prob if invert else coins < dropout_prob
    else:
        return labels.clone()
    return torch.where(drop, torch.full_like(labels, null), labels)


def label_dropout_force_plus_coins(labels, num_classes, dropout_prob, train, force_drop_ids=None):
    drop = torch.rand(labels.shape[0]) < dropout_prob  # coin flips even in evaluation, plus the forced ones
    if force_drop_ids is not None:
        drop = drop | (force_drop_ids == 1)
    elif not train:
        return labels.clone()
    return torch.where(drop, torch.full_like(labels, num_classes), labels)


def label_dropout_in_place(labels, num_classes, dropout_prob, train, force_drop_ids=None):
    out = label_dropout(labels, num_classes, dropout_prob, train, force_drop_ids)
    labels.copy_(out)
    return labels


def label_dropout_reference(labels, num_classes, dropout_prob, train, force_drop_ids=None):
    from minidit.embed import LabelEmbedder

    with torch.random.fork_rng(devices=[]):  # building the embedding table draws its weights
        emb = LabelEmbedder(num_classes, 4, dropout_prob)
    if (train and dropout_prob > 0) or force_drop_ids is not None:
        return emb.token_drop(labels, force_drop_ids)
    return labels


def label_dropout_flips(how):
    """Right rate, other coin flips: the almost-right answers."""

    def fn(labels, num_classes, dropout_prob, train, force_drop_ids=None):
        B = labels.shape[0]
        if force_drop_ids is not None:
            drop = force_drop_ids == 1
        elif train and dropout_prob > 0:
            if how == "above":
                drop = torch.rand(B) > 1 - dropout_prob
            elif how == "bernoulli":
                drop = torch.bernoulli(torch.full((B,), dropout_prob)).bool()
            elif how == "numpy":
                import numpy as np

                drop = torch.from_numpy(np.random.default_rng(0).random(B) < dropout_prob)
            elif how == "float64":
                drop = torch.rand(B, dtype=torch.float64) < dropout_prob
            else:  # "per label": one draw per label in a Python loop
                drop = torch.tensor([torch.rand(()).item() < dropout_prob for _ in range(B)])
        else:
            return labels.clone()
        return torch.where(drop, torch.full_like(labels, num_classes), labels)

    return fn


def label_dropout_draws_first(labels, num_classes, dropout_prob, train, force_drop_ids=None):
    coins = torch.rand(labels.shape[0]) < dropout_prob  # drawn even when no coin is needed
    if force_drop_ids is not None:
        drop = force_drop_ids == 1
    elif train:
        drop = coins
    else:
        return labels.clone()
    return torch.where(drop, torch.full_like(labels, num_classes), labels)


def label_dropout_draws_at_p0(labels, num_classes, dropout_prob, train, force_drop_ids=None):
    if force_drop_ids is not None:
        drop = force_drop_ids == 1
    elif train:  # no `dropout_prob > 0`: draws a batch of numbers for nothing
        drop = torch.rand(labels.shape[0]) < dropout_prob
    else:
        return labels.clone()
    return torch.where(drop, torch.full_like(labels, num_classes), labels)


LABEL_MISTAKES = {
    "null is K - 1": (lambda *a, **k: label_dropout(*a, **k, null=a[1] - 1), "the last *real* class"),
    "null is 0": (lambda *a, **k: label_dropout(*a, **k, null=0), "dropped labels became 0"),
    "drops in eval mode": (lambda *a, **k: label_dropout(*a, **k, eval_drop=True), "with train=False"),
    "inverted coin flips": (lambda *a, **k: label_dropout(*a, **k, invert=True), "your mask is inverted"),
    "force ignored in eval": (lambda *a, **k: label_dropout(*a, **k, force_in_eval=False),
                              "force_drop_ids was ignored with train=False"),
    "force combined with coins": (lambda *a, **k: label_dropout(*a, **k, combine=True), "*replaces* the random coin"),
    "right rate, drops where u > 1 - p": (label_dropout_flips("above"), "ABOVE 1 - dropout_prob"),
    "right rate, numpy's generator": (label_dropout_flips("numpy"), "not the reference's coin flips"),
    "right rate, float64 uniforms": (label_dropout_flips("float64"), "float64 uniform numbers"),
    "draws before looking at train/force": (label_dropout_draws_first, "with train=False, no coin is flipped"),
    "draws with dropout_prob = 0": (label_dropout_draws_at_p0, "with dropout_prob = 0, no coin is flipped"),
    "numpy array": (lambda *a, **k: label_dropout(*a, **k).numpy(), "should be a torch.Tensor"),
    "force plus coins, in eval too": (label_dropout_force_plus_coins, "with train=False, no coin is flipped"),
    "in place": (label_dropout_in_place, "changed its input in place"),
    "returns float": (lambda *a, **k: label_dropout(*a, **k).float(), "labels are integer indices"),
}  # fmt: skip


@pytest.mark.parametrize(
    "fn",  # torch.bernoulli and one torch.rand per label happen to draw the same numbers: equally right
    [label_dropout, label_dropout_reference, label_dropout_flips("bernoulli"), label_dropout_flips("per label")],
)
def test_label_dropout_right_answers_pass(fn, capsys):
    lesson02.check_label_dropout(fn)
    assert capsys.readouterr().out == "✅ Exercise 2.2 (label_dropout) passed\n"


def test_label_dropout_stub_fails():
    with pytest.raises(AssertionError, match=r"Exercise 2\.2 \(label_dropout\): not implemented yet"):
        lesson02.check_label_dropout(stub)


def test_other_coin_flips_break_the_lessons_comparison_with_token_drop():
    """Why 2.2 checks the exact flips: the lesson's next cell compares with minidit's token_drop, same seed."""
    labels = torch.arange(10).repeat(3)
    torch.manual_seed(3)
    mine = label_dropout_flips("above")(labels, 10, 0.1, True)
    torch.manual_seed(3)
    assert not torch.equal(mine, label_dropout_reference(labels, 10, 0.1, True))
    torch.manual_seed(3)
    mine = label_dropout(labels, 10, 0.1, True)
    torch.manual_seed(3)
    assert torch.equal(mine, label_dropout_reference(labels, 10, 0.1, True))


@pytest.mark.parametrize("name", LABEL_MISTAKES)
def test_label_dropout_mistakes_are_named(name):
    fn, hint = LABEL_MISTAKES[name]
    with pytest.raises(AssertionError, match=r"Exercise 2\.2 \(label_dropout\)") as err:
        lesson02.check_label_dropout(fn)
    assert hint in str(err.value), str(err.value)


def test_label_dropout_check_leaves_the_global_rng_alone():
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    lesson02.check_label_dropout(label_dropout)
    assert torch.equal(torch.rand(3), expected)


# --------------------------------------------------------------------------
# 2.3 (modulate)
# --------------------------------------------------------------------------


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def modulate_in_place(x, shift, scale):
    return x.mul_(1 + scale.unsqueeze(1)).add_(shift.unsqueeze(1))


MODULATE_MISTAKES = {
    "missing 1 +": (lambda x, shift, scale: x * scale.unsqueeze(1) + shift.unsqueeze(1), "you left out the `1 +`"),
    "shift and scale swapped": (lambda x, shift, scale: x * (1 + shift.unsqueeze(1)) + scale.unsqueeze(1),
                                "you swapped shift and scale"),
    "no unsqueeze (crashes when B != T)": (lambda x, shift, scale: x * (1 + scale) + shift, "unsqueeze(1) them"),
    "broadcast over the batch axis": (
        lambda x, shift, scale: x * (1 + scale.unsqueeze(0)) + shift.unsqueeze(0)
        if x.shape[0] == x.shape[1] else modulate(x, shift, scale),
        "broadcast over the *batch* axis"),
    "shift before scale": (lambda x, shift, scale: (x + shift.unsqueeze(1)) * (1 + scale.unsqueeze(1)),
                           "you shifted before scaling"),
    "sign of the scale": (lambda x, shift, scale: x * (1 - scale.unsqueeze(1)) + shift.unsqueeze(1),
                          "sign error: x · (1 - scale)"),
    "in place": (modulate_in_place, "changed its inputs in place"),
    "numpy array": (lambda x, shift, scale: modulate(x, shift, scale).numpy(), "should be a torch.Tensor"),
    "float64 result": (lambda x, shift, scale: modulate(x, shift, scale).double(), "expected torch.float32"),
}  # fmt: skip


def test_modulate_right_answer_passes(capsys):
    lesson02.check_modulate(modulate)
    assert capsys.readouterr().out == "✅ Exercise 2.3 (modulate) passed\n"


def test_modulate_stub_fails():
    with pytest.raises(AssertionError, match=r"Exercise 2\.3 \(modulate\): not implemented yet"):
        lesson02.check_modulate(stub)


@pytest.mark.parametrize("name", MODULATE_MISTAKES)
def test_modulate_mistakes_are_named(name):
    fn, hint = MODULATE_MISTAKES[name]
    with pytest.raises(AssertionError, match=r"Exercise 2\.3 \(modulate\)") as err:
        lesson02.check_modulate(fn)
    assert hint in str(err.value), str(err.value)


# --------------------------------------------------------------------------
# 2.4 (adaln_zero)
# --------------------------------------------------------------------------


class AdaLNZero(nn.Module):
    """The right answer; class attributes switch on one mistake at a time in the subclasses below."""

    order = ("shift", "scale", "gate")
    silu, eps, affine, zero_init, out_mult, gate_mode = True, 1e-6, False, True, 3, "gate"

    def __init__(self, hidden_size, fn):
        super().__init__()
        self.fn = fn
        D = hidden_size
        self.norm = nn.LayerNorm(D, elementwise_affine=self.affine, eps=self.eps)
        layers = [nn.SiLU()] if self.silu else [nn.Identity()]
        self.adaLN_modulation = nn.Sequential(*layers, nn.Linear(D, self.out_mult * D))
        if self.zero_init:
            nn.init.zeros_(self.adaLN_modulation[-1].weight)
            nn.init.zeros_(self.adaLN_modulation[-1].bias)

    def forward(self, x, c):
        parts = dict(zip(self.order, self.adaLN_modulation(c).chunk(3, dim=1)))
        h = modulate(self.norm(x), parts["shift"], parts["scale"])
        gate = parts["gate"].unsqueeze(1)
        if self.gate_mode == "none":
            return x + self.fn(h)
        if self.gate_mode == "one_plus":
            return x + (1 + gate) * self.fn(h)
        if self.gate_mode == "no_residual":
            return gate * self.fn(h)
        return x + gate * self.fn(h)


class WithoutZeroInit(AdaLNZero):
    zero_init = False


class ScaleShiftGate(AdaLNZero):
    order = ("scale", "shift", "gate")


class GateFirst(AdaLNZero):
    order = ("gate", "shift", "scale")


class Ungated(AdaLNZero):
    gate_mode = "none"


class OnePlusGate(AdaLNZero):
    gate_mode = "one_plus"


class NoResidual(AdaLNZero):
    gate_mode = "no_residual"


class DefaultEps(AdaLNZero):
    eps = 1e-5


class AffineNorm(AdaLNZero):
    affine = True


class NoSiLU(AdaLNZero):
    silu = False


class OnlyShiftScale(AdaLNZero):  # plain adaLN: 2D outputs (crashes in chunk(3) too, but the check looks first)
    out_mult = 2


class ChunkWithoutDim(AdaLNZero):
    def forward(self, x, c):
        shift, scale, gate = self.adaLN_modulation(c).chunk(3)  # splits the batch axis
        return x + gate.unsqueeze(1) * self.fn(modulate(self.norm(x), shift, scale))


class ZeroWeightOnly(AdaLNZero):
    def __init__(self, hidden_size, fn):
        super().__init__(hidden_size, fn)
        nn.init.normal_(self.adaLN_modulation[-1].bias)


class StubInit(nn.Module):
    def __init__(self, hidden_size, fn):
        super().__init__()
        self.fn = fn
        raise NotImplementedError("Exercise 2.4 (adaln_zero): replace this line with your code")


ADALN_MISTAKES = {
    "not zero-initialised": (WithoutZeroInit, ".weight and .bias are not zero at initialisation"),
    "only the weight zeroed": (ZeroWeightOnly, "adaLN_modulation[-1].bias is not zero"),
    "chunk order scale, shift, gate": (ScaleShiftGate, "(scale, shift, gate)"),
    "chunk order gate, shift, scale": (GateFirst, "(gate, shift, scale)"),
    "missing gate": (Ungated, "the branch is not gated"),
    "(1 + gate)": (OnePlusGate, "not x + (1 + gate)"),
    "missing residual": (NoResidual, "add the residual"),
    "LayerNorm eps 1e-5": (DefaultEps, "eps = 1e-5"),
    "LayerNorm with parameters": (AffineNorm, "DiT's LayerNorms hold no parameters"),
    "no SiLU": (NoSiLU, "goes through SiLU"),
    "plain adaLN (2D outputs)": (OnlyShiftScale, "adaLN-Zero adds a gate"),
    "chunk(3) without dim": (ChunkWithoutDim, "chunk(3) and no dim"),
}


def test_adaln_zero_right_answer_passes(capsys):
    lesson02.check_adaln_zero(AdaLNZero)
    assert capsys.readouterr().out == "✅ Exercise 2.4 (adaln_zero) passed\n"


def test_adaln_zero_stub_fails():
    with pytest.raises(AssertionError, match=r"Exercise 2\.4 \(adaln_zero\): not implemented yet"):
        lesson02.check_adaln_zero(StubInit)


@pytest.mark.parametrize("name", ADALN_MISTAKES)
def test_adaln_zero_mistakes_are_named(name):
    cls, hint = ADALN_MISTAKES[name]
    with pytest.raises(AssertionError, match=r"Exercise 2\.4 \(adaln_zero\)") as err:
        lesson02.check_adaln_zero(cls)
    assert hint in str(err.value), str(err.value)


def test_adaln_zero_matches_minidit_dit_block_branch():
    """The check's formula is the reference's: an attention-free DiTBlock branch built from minidit's pieces."""
    from minidit.model import DiTBlock

    torch.manual_seed(0)
    D = 16
    block = DiTBlock(D, num_heads=2)
    branch = AdaLNZero(D, block.mlp)
    with torch.no_grad():
        w, b = block.adaLN_modulation[1].weight, block.adaLN_modulation[1].bias
        branch.adaLN_modulation[1].weight.copy_(w[3 * D :])  # the MLP half: shift_mlp, scale_mlp, gate_mlp
        branch.adaLN_modulation[1].bias.copy_(b[3 * D :])
        block.attn.proj.weight.zero_()
        block.attn.proj.bias.zero_()  # attention branch contributes 0
        x, c = torch.randn(2, 5, D), torch.randn(2, D)
        torch.testing.assert_close(branch(x, c), block(x, c))


def _as_list(mistakes):
    return [(name, fn, (hint,)) for name, (fn, hint) in mistakes.items()]


MUTANTS = {  # exercise -> [(mistake, function, hint keywords)], for the course's mutant table
    "2.1 (timestep_embedding)": _as_list(TIMESTEP_MISTAKES),
    "2.2 (label_dropout)": _as_list(LABEL_MISTAKES),
    "2.3 (modulate)": _as_list(MODULATE_MISTAKES),
    "2.4 (adaln_zero)": _as_list(ADALN_MISTAKES),
}
CHECKS = {
    "2.1 (timestep_embedding)": lesson02.check_timestep_embedding,
    "2.2 (label_dropout)": lesson02.check_label_dropout,
    "2.3 (modulate)": lesson02.check_modulate,
    "2.4 (adaln_zero)": lesson02.check_adaln_zero,
}
