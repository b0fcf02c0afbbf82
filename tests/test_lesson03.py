"""Lesson 03's checks are real: the right answers pass (printing exactly the one success line), the stubs fail,
and plausible mistakes are each rejected with a hint that names them."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from minidit.attention import Attention
from minidit.course import lesson03
from minidit.course.checks import ExerciseFailed
from minidit.model import Mlp, modulate


def passes(check, fn, label, capsys):
    check(fn)
    assert capsys.readouterr().out == f"✅ Exercise {label} passed\n"


def rejected(check, fn, hint):
    with pytest.raises(ExerciseFailed) as err:
        check(fn)
    assert hint in str(err.value), str(err.value)
    return str(err.value)


def stub(*args, **kwargs):
    raise NotImplementedError("Exercise 3.x: replace this line with your code")


# --------------------------------------------------------------------------
# 3.1 (attention)
# --------------------------------------------------------------------------


def attention(q, k, v):
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    return scores.softmax(dim=-1) @ v


def attention_einsum(q, k, v):
    w = torch.einsum("bhnd,bhmd->bhnm", q, k).mul(q.shape[-1] ** -0.5).softmax(-1)
    return torch.einsum("bhnm,bhme->bhne", w, v)


def attention_sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v)


def attention_no_scale(q, k, v):
    return (q @ k.transpose(-2, -1)).softmax(dim=-1) @ v


def attention_over_d(q, k, v):
    return (q @ k.transpose(-2, -1) / q.shape[-1]).softmax(dim=-1) @ v


def attention_times_sqrt_d(q, k, v):
    return (q @ k.transpose(-2, -1) * math.sqrt(q.shape[-1])).softmax(dim=-1) @ v


def attention_softmax_queries(q, k, v):
    return (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).softmax(dim=-2) @ v


def attention_value_width(q, k, v):
    return (q @ k.transpose(-2, -1) / math.sqrt(v.shape[-1])).softmax(dim=-1) @ v


def attention_no_softmax(q, k, v):
    return (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])) @ v


def attention_weights_only(q, k, v):
    return (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).softmax(dim=-1)


def attention_k_q(q, k, v):
    return (k @ q.transpose(-2, -1) / math.sqrt(q.shape[-1])).softmax(dim=-1) @ v


@pytest.mark.parametrize("fn", [attention, attention_einsum, attention_sdpa])
def test_attention_passes(fn, capsys):
    passes(lesson03.check_attention, fn, "3.1 (attention)", capsys)


ATTENTION_MUTANTS = [
    ("no 1/√d", attention_no_scale, ("the 1/√d scale is missing",)),
    ("divided by d", attention_over_d, ("you divided the scores by d = 8",)),
    ("multiplied by √d", attention_times_sqrt_d, ("you multiplied the scores by √d",)),
    ("softmax over the queries", attention_softmax_queries, ("the softmax ran over the queries (dim=-2)",)),
    ("scaled by the width of v", attention_value_width, ("using the width of v",)),
    ("no softmax", attention_no_softmax, ("the softmax is missing",)),
    ("returns the weights", attention_weights_only, ("that is the shape of the attention WEIGHTS",)),
    ("k qᵀ", attention_k_q, ("the scores are transposed",)),
    ("numpy result", lambda q, k, v: attention(q, k, v).numpy(), ("should be a torch.Tensor",)),
]


@pytest.mark.parametrize("name, fn, hints", ATTENTION_MUTANTS, ids=[m[0] for m in ATTENTION_MUTANTS])
def test_attention_rejects(name, fn, hints):
    for hint in hints:
        rejected(lesson03.check_attention, fn, hint)


def test_attention_stub_fails():
    rejected(lesson03.check_attention, stub, "Exercise 3.1 (attention): not implemented yet")


def test_attention_failure_names_the_input():
    message = rejected(lesson03.check_attention, attention_no_scale, "the 1/√d scale is missing")
    assert "[input: q [2, 3, 5, 8], k [2, 3, 5, 8], v [2, 3, 5, 8]]" in message


# --------------------------------------------------------------------------
# 3.2 (multi_head)
# --------------------------------------------------------------------------


def multi_head(x, qkv, proj, num_heads, order=(0, 1, 2), layout="3hd", merge=True, use_proj=True, heads=None):
    B, N, D = x.shape
    H = heads or num_heads
    d = D // H
    if layout == "3hd":
        y = qkv(x).reshape(B, N, 3, H, d).permute(2, 0, 3, 1, 4)
    else:  # (B, N, H, 3, d): the heads split first
        y = qkv(x).reshape(B, N, H, 3, d).permute(3, 0, 2, 1, 4)
    q, k, v = (y[i] for i in order)
    out = attention(q, k, v)
    if merge == "dh":  # heads interleaved feature by feature
        out = out.permute(0, 2, 3, 1).reshape(B, N, D)
    else:
        out = out.transpose(1, 2).reshape(B, N, D) if merge else out.reshape(B, N, D)
    return proj(out) if use_proj else out


def multi_head_chunked(x, qkv, proj, num_heads):
    B, N, D = x.shape
    q, k, v = (t.view(B, N, num_heads, D // num_heads).transpose(1, 2) for t in qkv(x).chunk(3, dim=-1))
    return proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, D))


def multi_head_scale_by_D(x, qkv, proj, num_heads):
    B, N, D = x.shape
    q, k, v = qkv(x).reshape(B, N, 3, num_heads, D // num_heads).permute(2, 0, 3, 1, 4)
    out = (q @ k.transpose(-2, -1) / math.sqrt(D)).softmax(-1) @ v
    return proj(out.transpose(1, 2).reshape(B, N, D))


def multi_head_unmerged(x, qkv, proj, num_heads):
    B, N, D = x.shape
    q, k, v = qkv(x).reshape(B, N, 3, num_heads, D // num_heads).permute(2, 0, 3, 1, 4)
    return attention(q, k, v)


@pytest.mark.parametrize("fn", [multi_head, multi_head_chunked])
def test_multi_head_passes(fn, capsys):
    passes(lesson03.check_multi_head, fn, "3.2 (multi_head)", capsys)


MULTI_HEAD_MUTANTS = [
    ("q and k swapped", lambda x, qkv, proj, h: multi_head(x, qkv, proj, h, order=(1, 0, 2)),
     ("you used q = part 1, k = part 0",)),
    ("q and v swapped", lambda x, qkv, proj, h: multi_head(x, qkv, proj, h, order=(2, 1, 0)),
     ("q, k and v are taken in the wrong",)),
    ("features split (H, 3, d)", lambda x, qkv, proj, h: multi_head(x, qkv, proj, h, layout="h3d"),
     ("not [B, T, H, 3, d]",)),
    ("no output projection", lambda x, qkv, proj, h: multi_head(x, qkv, proj, h, use_proj=False),
     ("the output projection is missing",)),
    ("[B, H, T, d] reshaped straight to [B, T, D]", lambda x, qkv, proj, h: multi_head(x, qkv, proj, h, merge=False),
     ("the heads are merged wrongly",)),
    ("heads merged in the wrong order (d, H)", lambda x, qkv, proj, h: multi_head(x, qkv, proj, h, merge="dh"),
     ("merged in the wrong order", "laid out (H, d)")),
    ("one head", lambda x, qkv, proj, h: multi_head(x, qkv, proj, h, heads=1), ("you ran ONE head over all D = 12",)),
    ("scaled by 1/√D", multi_head_scale_by_D, ("you scaled by 1/√D = 1/√12",)),
    ("heads never merged", multi_head_unmerged, ("merge the heads back to [B, T, D]",)),
    ("numpy result", lambda x, qkv, proj, h: multi_head(x, qkv, proj, h).detach().numpy(),
     ("should be a torch.Tensor",)),
]  # fmt: skip


@pytest.mark.parametrize("name, fn, hints", MULTI_HEAD_MUTANTS, ids=[m[0] for m in MULTI_HEAD_MUTANTS])
def test_multi_head_rejects(name, fn, hints):
    for hint in hints:
        rejected(lesson03.check_multi_head, fn, hint)


def test_multi_head_stub_fails():
    rejected(lesson03.check_multi_head, stub, "Exercise 3.2 (multi_head): not implemented yet")


# --------------------------------------------------------------------------
# 3.3 (mlp)
# --------------------------------------------------------------------------


def gelu_tanh(h):
    return 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h**3)))


def mlp(x, fc1, fc2):
    return fc2(gelu_tanh(fc1(x)))


def mlp_pow(x, fc1, fc2):  # the same formula, written differently
    h = fc1(x)
    inner = math.sqrt(2 / math.pi) * h * (1 + 0.044715 * h * h)
    return fc2(h * (0.5 + 0.5 * torch.tanh(inner)))


def gelu_exact(h):
    return 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))


MLP_MUTANTS = [
    ("F.gelu (hidden by the check)", lambda x, fc1, fc2: fc2(F.gelu(fc1(x), approximate="tanh")),
     ("write the tanh GELU yourself",)),
    ("nn.GELU (hidden by the check)", lambda x, fc1, fc2: fc2(nn.GELU(approximate="tanh")(fc1(x))),
     ("write the tanh GELU yourself",)),
    ("exact (erf) GELU", lambda x, fc1, fc2: fc2(gelu_exact(fc1(x))), ("you used the EXACT (erf) GELU",)),
    ("ReLU", lambda x, fc1, fc2: fc2(torch.relu(fc1(x))), ("that is ReLU",)),
    ("SiLU", lambda x, fc1, fc2: fc2(F.silu(fc1(x))), ("that is SiLU",)),
    ("sigmoid GELU", lambda x, fc1, fc2: fc2(fc1(x) * torch.sigmoid(1.702 * fc1(x))), ("('quick GELU')",)),
    ("no cubic term", lambda x, fc1, fc2: fc2(0.5 * fc1(x) * (1 + torch.tanh(math.sqrt(2 / math.pi) * fc1(x)))),
     ("the 0.044715·h³ term is missing",)),
    ("no ½", lambda x, fc1, fc2: fc2(2 * gelu_tanh(fc1(x))), ("the leading factor ½ is missing",)),
    ("√(2π) for √(2/π)", lambda x, fc1, fc2: fc2(0.5 * fc1(x) * (1 + torch.tanh(
        math.sqrt(2 * math.pi) * (fc1(x) + 0.044715 * fc1(x) ** 3)))), ("not √(2π)",)),
    ("0.044715·h³ outside the bracket", lambda x, fc1, fc2: fc2(0.5 * fc1(x) * (1 + torch.tanh(
        math.sqrt(2 / math.pi) * fc1(x) + 0.044715 * fc1(x) ** 3))), ("inside the bracket",)),
    ("no activation", lambda x, fc1, fc2: fc2(fc1(x)), ("there is no activation between fc1 and fc2",)),
    ("activation after fc2", lambda x, fc1, fc2: gelu_tanh(fc2(fc1(x))), ("not after fc2",)),
    ("fc2 forgotten", lambda x, fc1, fc2: gelu_tanh(fc1(x)), ("did you forget fc2?",)),
    ("float64 result", lambda x, fc1, fc2: mlp(x, fc1, fc2).double(), ("expected torch.float32",)),
    ("numpy result", lambda x, fc1, fc2: mlp(x, fc1, fc2).numpy(), ("should be a torch.Tensor",)),
]  # fmt: skip


@pytest.mark.parametrize("fn", [mlp, mlp_pow])
def test_mlp_passes(fn, capsys):
    passes(lesson03.check_mlp, fn, "3.3 (mlp)", capsys)


@pytest.mark.parametrize("name, fn, hints", MLP_MUTANTS, ids=[m[0] for m in MLP_MUTANTS])
def test_mlp_rejects(name, fn, hints):
    for hint in hints:
        rejected(lesson03.check_mlp, fn, hint)


def test_mlp_check_hides_f_gelu_only_while_it_runs():
    gelu = F.gelu
    rejected(lesson03.check_mlp, MLP_MUTANTS[0][1], "switched off")
    assert F.gelu is gelu


# --------------------------------------------------------------------------
# 3.4 (dit_block)
# --------------------------------------------------------------------------


class Block(nn.Module):
    """The skeleton of the notebook, with the answer, and switches for the usual mistakes."""

    eps, affine = 1e-6, False
    order = ("shift_msa", "scale_msa", "gate_msa", "shift_mlp", "scale_mlp", "gate_mlp")

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0):
        super().__init__()
        self.attn = Attention(hidden_size, num_heads)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=self.affine, eps=self.eps)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=self.affine, eps=self.eps)

    def vectors(self, c):
        return dict(zip(self.order, self.adaLN_modulation(c).chunk(6, dim=1)))

    def forward(self, x, c):
        m = self.vectors(c)
        x = x + m["gate_msa"].unsqueeze(1) * self.attn(modulate(self.norm1(x), m["shift_msa"], m["scale_msa"]))
        x = x + m["gate_mlp"].unsqueeze(1) * self.mlp(modulate(self.norm2(x), m["shift_mlp"], m["scale_mlp"]))
        return x


class BlockByHand(nn.Module):
    """Also right: functional LayerNorm with the right eps, modulate written out, gates indexed."""

    def __init__(self, hidden_size, num_heads):
        super().__init__()
        self.attn = Attention(hidden_size, num_heads)
        self.mlp = Mlp(hidden_size, 4 * hidden_size)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x, c):
        m = self.adaLN_modulation(c)[:, None, :].chunk(6, dim=-1)
        h = F.layer_norm(x, x.shape[-1:], eps=1e-6) * (1 + m[1]) + m[0]
        x = x + m[2] * self.attn(h)
        h = F.layer_norm(x, x.shape[-1:], eps=1e-6) * (1 + m[4]) + m[3]
        return x + m[5] * self.mlp(h)


class Eps5(Block):
    eps = 1e-5


class Affine(Block):
    affine = True


class FunctionalEps5(BlockByHand):
    def forward(self, x, c):
        m = self.adaLN_modulation(c)[:, None, :].chunk(6, dim=-1)
        x = x + m[2] * self.attn(F.layer_norm(x, x.shape[-1:]) * (1 + m[1]) + m[0])
        return x + m[5] * self.mlp(F.layer_norm(x, x.shape[-1:]) * (1 + m[4]) + m[3])


class SwappedShiftScale(Block):
    order = ("scale_msa", "shift_msa", "gate_msa", "scale_mlp", "shift_mlp", "gate_mlp")


class GroupedByKind(Block):
    order = ("shift_msa", "shift_mlp", "scale_msa", "scale_mlp", "gate_msa", "gate_mlp")


class OddOrder(Block):  # not one of the plausible orders: found by the search over all 720
    order = ("shift_msa", "gate_mlp", "gate_msa", "shift_mlp", "scale_mlp", "scale_msa")


class NoGates(Block):
    def forward(self, x, c):
        m = self.vectors(c)
        x = x + self.attn(modulate(self.norm1(x), m["shift_msa"], m["scale_msa"]))
        return x + self.mlp(modulate(self.norm2(x), m["shift_mlp"], m["scale_mlp"]))


class NoMlpGate(Block):
    def forward(self, x, c):
        m = self.vectors(c)
        x = x + m["gate_msa"].unsqueeze(1) * self.attn(modulate(self.norm1(x), m["shift_msa"], m["scale_msa"]))
        return x + self.mlp(modulate(self.norm2(x), m["shift_mlp"], m["scale_mlp"]))


class NoOnePlus(Block):
    def forward(self, x, c):
        m = {k: v.unsqueeze(1) for k, v in self.vectors(c).items()}
        x = x + m["gate_msa"] * self.attn(self.norm1(x) * m["scale_msa"] + m["shift_msa"])
        return x + m["gate_mlp"] * self.mlp(self.norm2(x) * m["scale_mlp"] + m["shift_mlp"])


class ModulateAfter(Block):
    def forward(self, x, c):
        m = self.vectors(c)
        x = x + m["gate_msa"].unsqueeze(1) * modulate(self.attn(self.norm1(x)), m["shift_msa"], m["scale_msa"])
        return x + m["gate_mlp"].unsqueeze(1) * modulate(self.mlp(self.norm2(x)), m["shift_mlp"], m["scale_mlp"])


class ReusedNorm(Block):
    def forward(self, x, c):
        m = self.vectors(c)
        h = self.norm1(x)
        x = x + m["gate_msa"].unsqueeze(1) * self.attn(modulate(h, m["shift_msa"], m["scale_msa"]))
        return x + m["gate_mlp"].unsqueeze(1) * self.mlp(modulate(h, m["shift_mlp"], m["scale_mlp"]))


class NoUnsqueeze(Block):
    def forward(self, x, c):
        m = self.vectors(c)
        x = x + m["gate_msa"] * self.attn(self.norm1(x) * (1 + m["scale_msa"]) + m["shift_msa"])
        return x + m["gate_mlp"] * self.mlp(self.norm2(x) * (1 + m["scale_mlp"]) + m["shift_mlp"])


class SkippedSiLU(Block):
    def vectors(self, c):
        return dict(zip(self.order, self.adaLN_modulation[1](c).chunk(6, dim=1)))


class PostNorm(Block):
    def forward(self, x, c):
        m = self.vectors(c)
        x = self.norm1(x + m["gate_msa"].unsqueeze(1) * self.attn(modulate(x, m["shift_msa"], m["scale_msa"])))
        return self.norm2(x + m["gate_mlp"].unsqueeze(1) * self.mlp(modulate(x, m["shift_mlp"], m["scale_mlp"])))


class NoResidual(Block):
    def forward(self, x, c):
        m = self.vectors(c)
        x = m["gate_msa"].unsqueeze(1) * self.attn(modulate(self.norm1(x), m["shift_msa"], m["scale_msa"]))
        return m["gate_mlp"].unsqueeze(1) * self.mlp(modulate(self.norm2(x), m["shift_mlp"], m["scale_mlp"]))


class PostNormModulated(Block):  # post-norm, modulating the LayerNorm's output
    def forward(self, x, c):
        m = self.vectors(c)
        x = modulate(self.norm1(x + m["gate_msa"].unsqueeze(1) * self.attn(x)), m["shift_msa"], m["scale_msa"])
        return modulate(self.norm2(x + m["gate_mlp"].unsqueeze(1) * self.mlp(x)), m["shift_mlp"], m["scale_mlp"])


class MlpReusesAttentionShiftScale(Block):
    def forward(self, x, c):
        m = self.vectors(c)
        x = x + m["gate_msa"].unsqueeze(1) * self.attn(modulate(self.norm1(x), m["shift_msa"], m["scale_msa"]))
        return x + m["gate_mlp"].unsqueeze(1) * self.mlp(modulate(self.norm2(x), m["shift_msa"], m["scale_msa"]))


class ChunkWithoutDim(Block):
    def vectors(self, c):
        return dict(zip(self.order, self.adaLN_modulation(c).chunk(6)))  # splits the batch axis


class Renamed(Block):
    def __init__(self, hidden_size, num_heads):
        super().__init__(hidden_size, num_heads)
        self.ada = self.adaLN_modulation
        del self.adaLN_modulation

    def vectors(self, c):
        return dict(zip(self.order, self.ada(c).chunk(6, dim=1)))


class StubBlock(Block):
    def forward(self, x, c):
        raise NotImplementedError("Exercise 3.4 (dit_block): replace this line with your code")


class StubInit(nn.Module):
    def __init__(self, hidden_size, num_heads):
        super().__init__()
        raise NotImplementedError("Exercise 3.4 (dit_block): replace this line with your code")


@pytest.mark.parametrize("cls", [Block, BlockByHand])
def test_dit_block_passes(cls, capsys):
    passes(lesson03.check_dit_block, cls, "3.4 (dit_block)", capsys)


BLOCK_MUTANTS = [
    ("LayerNorm eps 1e-5", Eps5, ("norm1 has eps=1e-05; the DiT's LayerNorms use eps=1e-6",)),
    ("F.layer_norm with its default eps", FunctionalEps5, ("LayerNorm eps: the DiT's LayerNorms use eps=1e-6",)),
    ("LayerNorm with parameters", Affine, ("norm1 has learnable weight and bias",)),
    ("shift and scale swapped", SwappedShiftScale, ("the six adaLN vectors are in the wrong order (shift and scale",)),
    ("vectors grouped by kind", GroupedByKind, ("grouped by kind",)),
    ("an odd order", OddOrder, ("scale_msa = chunk 5, gate_mlp = chunk 1",)),
    ("no gates", NoGates, ("the gates are missing",)),
    ("no gate on the MLP", NoMlpGate, ("gate_mlp is missing from the MLP branch",)),
    ("h·scale + shift", NoOnePlus, ("you used h·scale + shift",)),
    ("modulate after the sublayer", ModulateAfter, ("modulate the normalised INPUT of each branch (pre-norm)",)),
    ("one LayerNorm for both branches", ReusedNorm, ("reused for both branches makes a 'parallel' block",)),
    ("no unsqueeze (B = T)", NoUnsqueeze, ("unsqueeze(1) them to [B, 1, D]",)),
    ("SiLU skipped", SkippedSiLU, ("adaLN_modulation is SiLU then Linear",)),
    ("post-norm", PostNorm, ("this is a post-norm block",)),
    ("post-norm, modulate after the LayerNorm", PostNormModulated, ("post-norm block", "modulates its INPUT")),
    ("MLP reuses the attention's shift and scale", MlpReusesAttentionShiftScale,
     ("reuses the attention branch's shift and scale",)),
    ("chunk(6) without dim", ChunkWithoutDim, ("chunk(6) and no dim", "BATCH axis")),
    ("no residual", NoResidual, ("the residual connections are missing",)),
    ("adaLN_modulation renamed", Renamed, ("your block's parameters do not match the reference layout",)),
]  # fmt: skip


@pytest.mark.parametrize("name, cls, hints", BLOCK_MUTANTS, ids=[m[0] for m in BLOCK_MUTANTS])
def test_dit_block_rejects(name, cls, hints):
    for hint in hints:
        rejected(lesson03.check_dit_block, cls, hint)


@pytest.mark.parametrize("cls", [StubBlock, StubInit])
def test_dit_block_stub_fails(cls):
    rejected(lesson03.check_dit_block, cls, "Exercise 3.4 (dit_block): not implemented yet")


def test_eps_mistake_is_caught_even_if_only_the_small_input_shows_it(monkeypatch):
    cases = lesson03._BLOCK_CASES
    assert cases[-1][-1] == 0.01
    monkeypatch.setattr(lesson03, "_BLOCK_CASES", [(B, T, D, H, 0.01) for B, T, D, H, _ in cases])
    message = rejected(lesson03.check_dit_block, FunctionalEps5, "LayerNorm eps")
    assert "(small: x·0.01)" in message


# --------------------------------------------------------------------------
# All checks: fast
# --------------------------------------------------------------------------


MUTANTS = {  # exercise -> [(mistake, function, hint keywords)], for the course's mutant table
    "3.1 (attention)": ATTENTION_MUTANTS,
    "3.2 (multi_head)": MULTI_HEAD_MUTANTS,
    "3.3 (mlp)": MLP_MUTANTS,
    "3.4 (dit_block)": BLOCK_MUTANTS,
}
CHECKS = {
    "3.1 (attention)": lesson03.check_attention,
    "3.2 (multi_head)": lesson03.check_multi_head,
    "3.3 (mlp)": lesson03.check_mlp,
    "3.4 (dit_block)": lesson03.check_dit_block,
}
