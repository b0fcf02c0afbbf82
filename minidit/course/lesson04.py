"""Checks of lesson 04 (the full DiT and its zoo): forward, initialisation, cost, guidance, loading.

Each check builds small DiTs from ``minidit.model`` with seeded random weights (a freshly initialised
DiT outputs exactly zero, so comparing fresh models would prove nothing), runs the learner's function
on them, compares with the reference and, on a mismatch, recomputes the known wrong variants of the
exercise (no ``pos_embed``, ``c = t`` only, guided variance channels, FLOPs instead of MACs, ...) to name
the mistake in the hint.
"""

from __future__ import annotations

import contextlib
import math
import tempfile
from pathlib import Path

import torch
from torch import nn

from ..checkpoint import save_checkpoint
from ..embed import get_2d_sincos_pos_embed
from ..model import DiT
from ..stats import model_stats
from . import checks
from .checks import ExerciseFailed

__all__ = [
    "random_dit",
    "check_dit_forward",
    "check_initialize_weights",
    "check_count_params_and_macs",
    "check_forward_with_cfg",
    "check_load_official",
]


def random_dit(seed: int = 0, **config) -> DiT:
    """A DiT (``DiT(**config)``) whose every trainable weight is random (seeded), in eval mode.

    Matrices get N(0, 1/fan_in), biases N(0, 0.1^2), the label table N(0, 1): every part of the network
    (including the adaLN regressors and the output layer, zero in a fresh DiT) changes the output.
    The global RNG is left as it was.
    """
    with torch.random.fork_rng(devices=[]):
        model = DiT(**config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            if "embedding_table" in name:
                std = 1.0
            elif p.dim() > 1:
                std = 1.0 / math.sqrt(p[0].numel())
            else:
                std = 0.1
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model.eval()


def _fresh_dit(**config) -> DiT:
    """``DiT(**config)`` built without touching the caller's global RNG."""
    with torch.random.fork_rng(devices=[]):
        return DiT(**config)


def _inputs(model: DiT, B: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = checks.seeded(seed)
    x = torch.randn(B, model.in_channels, model.input_size, model.input_size, generator=g)
    t = torch.randint(0, 1000, (B,), generator=g)
    y = torch.randint(0, model.num_classes, (B,), generator=g)
    return x, t, y


@contextlib.contextmanager
def _seed(seed: int):
    """Run a block with the global RNG seeded, and leave the caller's RNG state as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _raised(err: BaseException, limit: int = 300) -> str:
    """One line saying what the learner's function raised (long messages, e.g. a list of 200 keys, cut short)."""
    text = " ".join(str(err).split())
    if len(text) > limit:
        text = text[:limit] + " ..."
    return f"your function raised {type(err).__name__}: {text}."


# --------------------------------------------------------------------------
# Exercise 4.1 (dit_forward)
# --------------------------------------------------------------------------

_FORWARD_CASES = [  # (config, batch, training mode)
    (dict(input_size=8, patch_size=2, in_channels=3, hidden_size=48, depth=1, num_heads=3, num_classes=7,
          learn_sigma=False), 2, False),
    (dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4, num_classes=10), 3, False),
    (dict(input_size=12, patch_size=4, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=5,
          class_dropout_prob=0.5), 8, True),
]  # fmt: skip


def _forward_variant(
    model: DiT, x, t, y, pos: bool = True, use_t: bool = True, use_y: bool = True, train: bool | None = None
) -> torch.Tensor:
    """The reference forward with one piece left out or changed (to name a learner's mistake)."""
    tokens = model.x_embedder(x) + (model.pos_embed if pos else 0)
    train = model.training if train is None else train
    c = 0
    if use_t:
        c = c + model.t_embedder(t)
    if use_y:
        c = c + model.y_embedder(y, train)
    for block in model.blocks:
        tokens = block(tokens, c)
    return model.unpatchify(model.final_layer(tokens, c))


def _forbidden_forward(*args, **kwargs):
    raise ExerciseFailed(
        "Exercise 4.1 (dit_forward): build the forward from the model's submodules (x_embedder, pos_embed, "
        "t_embedder, y_embedder, blocks, final_layer, unpatchify); calling model(...) or model.forward(...) "
        "would only return the reference's answer."
    )


def check_dit_forward(fn) -> None:
    """``fn(model, x, t, y)`` must equal ``model(x, t, y)`` built from the submodules, in eval and train mode."""
    ex = "4.1 (dit_forward)"
    earlier_ok = False
    for i, (config, B, train) in enumerate(_FORWARD_CASES):
        model = random_dit(40 + i, **config).train(train)
        x, t, y = _inputs(model, B, seed=10 + i)
        T, D, p, C2 = model.x_embedder.num_patches, model.hidden_size, model.patch_size, model.out_channels
        size, C = model.input_size, model.in_channels
        where = (
            f" [model: I={size}, p={p}, C={C}, out_channels={C2}, D={D}, depth {len(model.blocks)}, "
            f"{'train' if train else 'eval'} mode; batch {B}]"
        )
        with torch.no_grad(), _seed(7):
            expected = model(x, t, y)
        model.forward = _forbidden_forward  # the instance attribute shadows DiT.forward
        try:
            with torch.no_grad(), _seed(7):
                got = fn(model, x, t, y)
        except NotImplementedError:
            checks.fail(ex, "not implemented yet: replace the `raise NotImplementedError(...)` line with your code.")
        except ExerciseFailed:
            raise
        except Exception as e:
            hint = ""
            if earlier_ok and C2 != C:
                hint = (
                    " It worked with learn_sigma=False (out_channels == in_channels) and breaks with learn_sigma=True:"
                    f" did you unpatchify with in_channels ({C}) instead of out_channels (2C = {C2})? The final "
                    f"layer predicts p*p*2C = {p * p * C2} numbers per token: epsilon and the variance interpolant v."
                )
            checks.fail(ex, _raised(e) + hint + where)
        finally:
            del model.forward
        got = checks.expect_tensor(ex, got)
        shape_hints = {
            (B, T, p * p * C2): "You returned the tokens: unpatchify them into an image [B, out_channels, I, I].",
            (B, T, D): "You returned the hidden tokens: apply model.final_layer(x, c), then unpatchify.",
            (B, C, size, size): f"out_channels is 2C = {C2} with learn_sigma (epsilon and v): unpatchify with "
            "model.out_channels, not model.in_channels.",
        }
        if C2 == C:
            shape_hints.pop((B, C, size, size))
        try:
            checks.expect_shape(ex, got, tuple(expected.shape), shape_hints)
        except ExerciseFailed as e:
            raise ExerciseFailed(f"{e}{where}") from None

        def diagnose(g, model=model, x=x, t=t, y=y, train=train):
            variants = [
                (dict(pos=False), "you forgot the position table: tokens = x_embedder(x) + pos_embed."),
                (dict(use_y=False), "the condition ignores the label: c = t_embedder(t) + y_embedder(y, training)."),
                (dict(use_t=False), "the condition ignores the timestep: c = t_embedder(t) + y_embedder(y, ...)."),
                (dict(pos=False, use_y=False), "no pos_embed, and c = t_embedder(t) only (the label is missing)."),
            ]
            if train:
                variants.append(
                    (
                        dict(train=False),
                        "labels are never dropped in training mode: pass model.training to y_embedder "
                        "(label dropout with probability class_dropout_prob is what makes CFG possible).",
                    )
                )
            else:
                variants.append(
                    (
                        dict(train=True),
                        "labels are dropped in eval mode: pass model.training (False here) to y_embedder, not True.",
                    )
                )
            for kwargs, hint in variants:
                with torch.no_grad(), _seed(7):
                    candidate = _forward_variant(model, x, t, y, **kwargs)
                if checks.matches(g, candidate, atol=1e-5):
                    return hint
            return (
                "no known slip matches: go through the equations of section 1 line by line (tokens and "
                "position table, the condition, every block once and in order, the final layer with the same "
                "condition, unpatchify)."
            )

        try:
            checks.expect_close(ex, got, expected, atol=1e-5, rtol=1e-5, diagnose=diagnose, what="outputs")
        except ExerciseFailed as e:
            raise ExerciseFailed(f"{e}{where}") from None
        earlier_ok = True
    checks.passed(ex)


# --------------------------------------------------------------------------
# Exercise 4.2 (initialize_weights)
# --------------------------------------------------------------------------

_INIT_CASES = [
    dict(input_size=16, patch_size=4, in_channels=4, hidden_size=64, depth=2, num_heads=4, num_classes=10),
    dict(input_size=8, patch_size=2, in_channels=3, hidden_size=48, depth=1, num_heads=2, num_classes=5,
         learn_sigma=False, class_dropout_prob=0.0),
]  # fmt: skip


def _scramble(model: nn.Module, seed: int) -> None:
    """Overwrite every parameter with N(0.3, 0.5^2): whatever the learner forgets to set stays visibly wrong."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.3 + 0.5 * torch.randn(p.shape, generator=g))


def _stat_tol(n: int) -> float:
    """Relative tolerance of a standard deviation estimated from n samples (5 sigma, at least 10%)."""
    return max(0.1, 5.0 / math.sqrt(2 * n))


def _expect_zero_tensor(ex: str, name: str, w: torch.Tensor, hint: str) -> None:
    if torch.count_nonzero(w.detach()) != 0:
        checks.fail(ex, f"{name} should be exactly zero, but max |value| = {w.detach().abs().max().item():.3g}. {hint}")


def _expect_xavier(ex: str, name: str, w: torch.Tensor, fan_in: int, fan_out: int, conv: bool = False) -> None:
    w = w.detach().double()
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    n, std, top = w.numel(), w.std().item(), w.abs().max().item()
    tol = _stat_tol(n)
    ok = top <= bound * (1 + 1e-6) and abs(std / (bound / math.sqrt(3)) - 1) < tol and top > 0.9 * bound
    if ok:
        return
    msg = (
        f"{name} {tuple(w.shape)} should be Xavier-uniform: U(-a, a) with a = sqrt(6 / (fan_in + fan_out)) = "
        f"sqrt(6 / ({fan_in} + {fan_out})) = {bound:.4f}; got max |w| = {top:.4f}, std {std:.4f} "
        f"(expected {bound / math.sqrt(3):.4f})."
    )
    if conv:
        p2 = w[0, 0].numel()
        bound4 = math.sqrt(6.0 / (fan_in + fan_out * p2))
        if top <= bound4 * (1 + 1e-6) and abs(std / (bound4 / math.sqrt(3)) - 1) < tol:
            checks.fail(
                ex,
                msg + f" Your bound is {bound4:.4f}: you applied xavier_uniform_ to the 4-D conv weight, for which "
                f"PyTorch counts fan_out = D*p*p = {fan_out * p2}. The reference treats the patch embedding as the "
                "Linear it is: xavier_uniform_(w.view(w.shape[0], -1)), fan_out = D.",
            )
    if top > bound * (1 + 1e-6) and top > 2.5 * std:
        checks.fail(ex, msg + " Values exceed the bound with a bell-shaped spread: xavier_normal_ (or randn) instead "
                    "of xavier_uniform_?")  # fmt: skip
    if top < 0.9 * bound and std < bound / math.sqrt(3) * (1 - tol):
        checks.fail(ex, msg + " Your values are too small: is this PyTorch's default init (kaiming_uniform_, bound "
                    "1/sqrt(fan_in)) rather than xavier_uniform_?")  # fmt: skip
    checks.fail(ex, msg)


def _expect_normal(ex: str, name: str, w: torch.Tensor, std: float, hint: str) -> None:
    w = w.detach().double()
    n, got_std, mean = w.numel(), w.std().item(), w.mean().item()
    if abs(got_std / std - 1) < _stat_tol(n) and abs(mean) < 5 * std / math.sqrt(n):
        return
    checks.fail(ex, f"{name} {tuple(w.shape)} should be N(0, {std}^2): got mean {mean:.4f}, std {got_std:.4f}. {hint}")


_DRAW_ORDER = (
    "With the same seed, the reference draws its random numbers in this order: (1) every nn.Linear, in the order "
    "model.modules() visits them, a Xavier-uniform weight (biases are zeros: no draw); (2) pos_embed, no draw; "
    "(3) the patch embedding's weight, Xavier-uniform on its [D, C*p*p] view; (4) the label table, then the weights "
    "of t_embedder.mlp[0] and mlp[2], each N(0, 0.02^2); (5) zeros, no draw. Another order, or one draw too many "
    "(a tensor initialised twice), shifts every number after it."
)


def check_initialize_weights(fn) -> None:
    """``fn(model)`` initialises a DiT in place, as the reference does: the right distributions (named in the
    hints), and with the same seed exactly the reference's numbers (same draws, same order)."""
    ex = "4.2 (initialize_weights)"
    for i, config in enumerate(_INIT_CASES):
        model = _fresh_dit(**config)
        _scramble(model, seed=100 + i)
        with _seed(3):
            checks.call(ex, fn, model)
        reference = _fresh_dit(**config)
        _scramble(reference, seed=100 + i)
        with _seed(3):
            reference.initialize_weights()
        D, p, C = model.hidden_size, model.patch_size, model.in_channels
        where = f" [model: D={D}, p={p}, C={C}, depth {len(model.blocks)}, out_channels={model.out_channels}]"
        try:
            _check_init(ex, model, D, p, C)
            _check_same_numbers(ex, model, reference)
        except ExerciseFailed as e:
            raise ExerciseFailed(f"{e}{where}") from None
    checks.passed(ex)


def _check_same_numbers(ex: str, model: DiT, reference: DiT) -> None:
    """Every tensor equal to the reference's, drawn from the same seed (the statistics are already right)."""
    mine = dict(model.named_parameters())
    for name, want in reference.named_parameters():
        got = mine[name].detach()
        if got.dtype != want.dtype:
            checks.fail(ex, f"{name} is {got.dtype}, the model's parameters are {want.dtype}.")
        if not torch.equal(got, want.detach()):
            checks.fail(
                ex,
                f"{name} has the right distribution but not the reference's numbers (the global RNG was seeded "
                f"the same way for both). {_DRAW_ORDER}",
            )


def _check_init(ex: str, model: DiT, D: int, p: int, C: int) -> None:
    # The zeros of adaLN-Zero first: they are the point of the exercise.
    for n, block in enumerate(model.blocks):
        lin = block.adaLN_modulation[-1]
        for kind in ("weight", "bias"):
            _expect_zero_tensor(
                ex, f"blocks.{n}.adaLN_modulation.1.{kind}", getattr(lin, kind),
                "adaLN-Zero: zero the last Linear of every block's adaLN_modulation (weight AND bias), so every "
                "gate starts at 0 and every block is the identity.",
            )  # fmt: skip
    for kind in ("weight", "bias"):
        _expect_zero_tensor(
            ex, f"final_layer.adaLN_modulation.1.{kind}", getattr(model.final_layer.adaLN_modulation[-1], kind),
            "Zero the final layer's adaLN regressor too (shift = scale = 0 at init).",
        )  # fmt: skip
        _expect_zero_tensor(
            ex, f"final_layer.linear.{kind}", getattr(model.final_layer.linear, kind),
            "Zero the output Linear (weight and bias): a fresh DiT must output exactly 0.",
        )  # fmt: skip
    # Xavier-uniform Linears with zero bias.
    for n, block in enumerate(model.blocks):
        for sub in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"):
            lin = block.get_submodule(sub)
            _expect_zero_tensor(ex, f"blocks.{n}.{sub}.bias", lin.bias, "Every Linear's bias starts at zero.")
            _expect_xavier(ex, f"blocks.{n}.{sub}.weight", lin.weight, lin.in_features, lin.out_features)
    # The patch embedding: Xavier on the [D, C*p*p] view, zero bias.
    proj = model.x_embedder.proj
    _expect_zero_tensor(ex, "x_embedder.proj.bias", proj.bias, "The patch embedding's bias starts at zero.")
    _expect_xavier(ex, "x_embedder.proj.weight", proj.weight, C * p * p, D, conv=True)
    # Timestep MLP and label table: N(0, 0.02).
    for k in (0, 2):
        lin = model.t_embedder.mlp[k]
        _expect_zero_tensor(
            ex, f"t_embedder.mlp.{k}.bias", lin.bias,
            "The timestep MLP's biases are zero (every Linear's bias is; only its weights are N(0, 0.02)).",
        )  # fmt: skip
        _expect_normal(
            ex, f"t_embedder.mlp.{k}.weight", lin.weight, 0.02,
            "Both Linears of the timestep MLP are re-initialised with nn.init.normal_(w, std=0.02) after the "
            "Xavier pass.",
        )  # fmt: skip
    _expect_normal(
        ex, "y_embedder.embedding_table.weight", model.y_embedder.embedding_table.weight, 0.02,
        "The label table is nn.init.normal_(table, std=0.02) (nn.Embedding's own default is N(0, 1)).",
    )  # fmt: skip
    # The fixed position table, still frozen.
    pos = model.pos_embed
    if pos.requires_grad:
        checks.fail(ex, "pos_embed must stay frozen (requires_grad=False): copy the table into pos_embed.data.")
    grid = model.x_embedder.grid_size
    table = torch.from_numpy(get_2d_sincos_pos_embed(D, grid)).float().unsqueeze(0)
    if not checks.matches(pos.detach(), table, atol=1e-6):
        half = D // 2
        swapped = torch.cat([table[..., half:], table[..., :half]], dim=-1)
        hint = (
            "the halves are swapped: the first D/2 channels encode the column, the last D/2 the row."
            if checks.matches(pos.detach(), swapped, atol=1e-6)
            else "copy get_2d_sincos_pos_embed(D, grid_size) (float64 -> float32, shape [1, T, D]) into pos_embed."
        )
        checks.fail(ex, f"pos_embed is not the fixed 2-D sin-cos table: {hint}")
    # And the point of it all: a fresh DiT outputs exactly zero.
    x, t, y = _inputs(model, 2, seed=5)
    with torch.no_grad():
        out = model.eval()(x, t, y)
    if torch.count_nonzero(out) != 0:
        checks.fail(ex, f"a freshly initialised DiT should output exactly 0, got max |out| = {out.abs().max():.3g}.")


# --------------------------------------------------------------------------
# Exercise 4.3 (count_params_and_macs)
# --------------------------------------------------------------------------

#: Measured with ``minidit.stats.model_stats`` (FlopCounterMode on the meta device); tests/test_lesson04.py
#: re-measures every entry, so the check stays fast (the first FlopCounterMode of a process takes seconds).
KNOWN_STATS: dict[str, tuple[dict, int, float]] = {
    "DiT-XL/2": (dict(depth=28, hidden_size=1152, patch_size=2), 675_129_632, 118.621421568),
    "DiT-S/8": (dict(depth=12, hidden_size=384, patch_size=8), 33_148_160, 0.357974016),
    "a 3-block DiT on 12x12x3 inputs, p=3, learn_sigma=False": (
        dict(depth=3, hidden_size=96, patch_size=3, input_size=12, in_channels=3, num_classes=7, learn_sigma=False),
        562_203,
        0.005756928,
    ),
    "a 2-block DiT on 16x16x4 inputs, p=2, 10 classes": (
        dict(depth=2, hidden_size=64, patch_size=2, input_size=16, in_channels=4, num_classes=10, learn_sigma=True),
        186_272,
        0.007614464,
    ),
}


def measure(config: dict) -> tuple[int, float]:
    """(params, forward GMACs per image) of ``DiT(**config)``, measured by ``model_stats`` on the meta device."""
    with torch.device("meta"):
        model = DiT(num_heads=4 if config["hidden_size"] % 4 == 0 else 1, **config)
    s = model_stats(model)
    return s.params, s.gmacs


def _count_parts(depth, hidden_size, patch_size, input_size=32, in_channels=4, num_classes=1000, learn_sigma=True):
    """The pieces of the parameter and MAC counts, to name what a learner's count left out."""
    N, D, p, C, K = depth, hidden_size, patch_size, in_channels, num_classes
    T, out = (input_size // p) ** 2, (2 if learn_sigma else 1) * in_channels
    return dict(
        T=T, D=D, N=N, p=p, C=C, K=K, out=out,
        biases=D + D + D + N * (3 * D + D + 4 * D + D + 6 * D) + 2 * D + p * p * out,
        ada_params=N * (6 * D * D + 6 * D) + 2 * D * D + 2 * D,
        t_params=256 * D + D + D * D + D,
        attn_macs=N * 2 * T * T * D,
        per_image_macs=N * 6 * D * D + 2 * D * D + 256 * D + D * D,
    )  # fmt: skip


def _params_hint(got: int, want: int, k: dict) -> str:
    T, D, p, C, K, out = k["T"], k["D"], k["p"], k["C"], k["K"], k["out"]
    d = want - got
    known = [
        (T * D, f"you left out pos_embed (T*D = {T * D:,}): it is a frozen parameter, but a parameter, and it is in "
         "the state dict; the paper's counts include it."),
        (D, f"the label table has num_classes + 1 rows (K+1 = {K + 1}): the last row is the null label of CFG."),
        (k["biases"], "you left out the biases (every Linear and the patch-embedding conv has one)."),
        (k["ada_params"], "you left out the adaLN regressors (6D x D + 6D per block, 2D x D + 2D in the final layer)."),
        (k["ada_params"] - 2 * D * D - 2 * D, "you left out the blocks' adaLN regressors (SiLU -> Linear(D, 6D))."),
        (2 * D * D + 2 * D, "you left out the final layer's adaLN regressor (Linear(D, 2D))."),
        (k["t_params"], "you left out the timestep MLP (Linear(256, D), SiLU, Linear(D, D))."),
        ((K + 1) * D, "you left out the label table ((K+1) x D)."),
    ]  # fmt: skip
    if out == 2 * C:
        known.append(
            (p * p * C * (D + 1), "the final Linear predicts p*p*out_channels numbers per token, with out_channels "
             "= 2C when learn_sigma (epsilon and v): you used C.")
        )  # fmt: skip
    for diff, hint in known:
        if d == diff:
            return hint
    return "count every tensor of the state dict: pos_embed, x_embedder, t_embedder, y_embedder, blocks, final_layer."


def _macs_hint(got: float, want: float, k: dict) -> str:
    T, D, N = k["T"], k["D"], k["N"]

    def close(a: float, b: float) -> bool:
        return abs(a - b) <= 1e-6 * abs(b) + 1e-12

    C, p, out = k["C"], k["p"], k["out"]
    known = [
        (2 * want, "that is twice the answer: you counted FLOPs (2 per multiply-accumulate). The paper's 'Gflops' "
         "are MACs."),
        (want * 1e9, "return billions of MACs (GMACs): divide by 1e9."),
        (want - k["attn_macs"] / 1e9, f"you left out the attention matmuls: Q K^T and A V cost T*T*D each per block "
         f"({N} x 2 x {T}^2 x {D})."),
        (want - k["attn_macs"] / 2e9, "you counted only one of the two attention matmuls (Q K^T and A V: T*T*D each)."),
        (want - k["per_image_macs"] / 1e9, "you left out what runs once per image: the timestep MLP and the adaLN "
         "regressors (6D x D per block, 2D x D in the final layer)."),
        (want + k["per_image_macs"] * (T - 1) / 1e9 - (256 * D + D * D) * (T - 1) / 1e9, "the adaLN regressors run "
         "once per image (on c: [B, D]), not once per token."),
        (want + k["per_image_macs"] * (T - 1) / 1e9, "the timestep MLP and the adaLN regressors run once per image "
         "(on [B, 256] and c: [B, D]), not once per token."),
        (want - T * C * p * p * D / 1e9, "you left out the patch embedding: T tokens x (C*p*p) x D."),
        (want - T * D * p * p * out / 1e9, "you left out the final Linear: T tokens x D x (p*p*out_channels)."),
    ]  # fmt: skip
    for value, hint in known:
        if close(got, value):
            return hint
    return (
        "no single known slip explains it: go term by term, per image: the patch embedding and the final Linear "
        "(per token), the timestep MLP (per image), and in each block the adaLN regressor (per image), qkv, proj "
        "and the MLP (per token) and the two attention matmuls."
    )


def check_count_params_and_macs(fn) -> None:
    """``fn(depth, hidden_size, patch_size, input_size, in_channels, num_classes, learn_sigma) -> (params, gmacs)``."""
    ex = "4.3 (count_params_and_macs)"
    for name, (cfg, want_params, want_gmacs) in KNOWN_STATS.items():
        got = checks.call(ex, fn, **cfg)
        if not (isinstance(got, (tuple, list)) and len(got) == 2):
            checks.fail(ex, f"return a pair (params, gmacs), got {type(got).__name__}.")
        params, gmacs = got
        params = params.item() if isinstance(params, torch.Tensor) else params
        if isinstance(params, float):
            checks.fail(
                ex,
                f"{name}: params is a float ({params:,}): a parameter count is an int. A / where // belongs "
                "(T = (input_size / p) ** 2 is a float) makes everything after it a float, and the lesson's "
                "table prints it with {:,}.",
            )
        gmacs = gmacs.item() if isinstance(gmacs, torch.Tensor) else gmacs
        k = _count_parts(**cfg)
        if int(params) != params or int(params) != want_params:
            checks.fail(
                ex,
                f"{name}: got {params:,} parameters, expected {want_params:,} (difference {want_params - params:+,}): "
                + _params_hint(int(params), want_params, k),
            )
        if not abs(float(gmacs) - want_gmacs) <= 1e-6 * want_gmacs:
            checks.fail(
                ex,
                f"{name}: got {float(gmacs):.6g} GMACs, expected {want_gmacs:.6g} (measured with FlopCounterMode): "
                + _macs_hint(float(gmacs), want_gmacs, k),
            )
    checks.passed(ex)


# --------------------------------------------------------------------------
# Exercise 4.4 (forward_with_cfg)
# --------------------------------------------------------------------------

_CFG_MODEL = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=48, depth=2, num_heads=3, num_classes=10)
_CFG_MODEL_NO_SIGMA = {**_CFG_MODEL, "learn_sigma": False}
_CFG_CASES = [  # (model config, half batch, cfg_scale, guided_channels: "default" = not passed)
    (_CFG_MODEL, 2, 4.0, "default"),
    (_CFG_MODEL, 3, 1.5, None),
    (_CFG_MODEL, 2, 3.0, 2),
    (_CFG_MODEL_NO_SIGMA, 2, 2.0, "default"),
]


def _cfg_variant(model: DiT, x, t, y, s: float, n: int, how: str) -> torch.Tensor:
    """A known-wrong classifier-free guidance: guided channels ``n`` and a combination rule ``how``."""
    B = len(x) // 2
    src = x if how == "full_x" else torch.cat([x[:B], x[:B]])
    out = model(src, t, y)
    eps, rest = out[:, :n], out[:, n:]
    cond, uncond = eps[:B], eps[B:]
    if how == "no_difference":
        guided = uncond + s * cond
    elif how == "swapped":
        guided = cond + s * (uncond - cond)
    elif how == "from_cond":
        guided = cond + s * (cond - uncond)
    else:
        guided = uncond + s * (cond - uncond)
    return torch.cat([torch.cat([guided, guided]), rest], dim=1)


def _forbidden_cfg(*args, **kwargs):
    raise ExerciseFailed(
        "Exercise 4.4 (forward_with_cfg): write the guidance yourself with one call of model(...); calling "
        "model.forward_with_cfg(...) would only return the reference's answer."
    )


def check_forward_with_cfg(fn) -> None:
    """``fn(model, x, t, y, cfg_scale, guided_channels=3)`` must equal ``model.forward_with_cfg``."""
    ex = "4.4 (forward_with_cfg)"
    for i, (config, B, s, gc) in enumerate(_CFG_CASES):
        model = random_dit(60 + (config is _CFG_MODEL_NO_SIGMA), **config)
        g = checks.seeded(20 + i)
        x = torch.randn(2 * B, model.in_channels, model.input_size, model.input_size, generator=g)
        t = torch.randint(0, 1000, (B,), generator=g).repeat(2)
        y = torch.cat([torch.randint(0, model.num_classes, (B,), generator=g), torch.full((B,), model.num_classes)])
        kwargs = {} if gc == "default" else {"guided_channels": gc}
        n = {"default": 3, None: model.in_channels}.get(gc, gc)
        with torch.no_grad():
            expected = model.forward_with_cfg(x, t, y, s, **kwargs)
            model.forward_with_cfg = _forbidden_cfg  # the instance attribute shadows DiT.forward_with_cfg
            try:
                got = checks.call(ex, fn, model, x, t, y, s, **kwargs)
            finally:
                del model.forward_with_cfg
        got = checks.expect_tensor(ex, got)
        size, C2 = model.input_size, model.out_channels
        call = f"guided_channels={gc!r}" if gc != "default" else "guided_channels not passed (default 3)"
        where = f" [half batch B={B}, cfg_scale={s}, {call}, out_channels={C2}]"
        shape_hints = {
            (B, C2, size, size): "You returned one half: return the guided prediction for BOTH halves, [2B, "
            "out_channels, I, I] (the sampler steps the whole doubled batch and keeps the first half).",
            (2 * B, n, size, size): "Keep the unguided channels: concatenate the guided epsilon with the rest.",
        }
        try:
            checks.expect_shape(ex, got, tuple(expected.shape), shape_hints)
        except ExerciseFailed as e:
            raise ExerciseFailed(f"{e}{where}") from None

        def diagnose(gt, model=model, x=x, t=t, y=y, s=s, n=n, gc=gc):
            C = model.in_channels
            variants = []
            if gc == "default":
                variants.append(
                    (C, "ok", "you guided all 4 epsilon channels by default: the reference's default guides only the "
                     "first 3 (guided_channels=3, a GLIDE leftover kept for exact reproducibility of FID 2.27).")
                )  # fmt: skip
            if gc is None:
                variants.append(
                    (3, "ok", "guided_channels=None means all in_channels epsilon channels (4), not 3.")
                )  # fmt: skip
            variants += [
                (model.out_channels, "ok", "you guided the variance channels too: only the first n of the in_channels "
                 "epsilon channels are guided; v (the last C channels) stays conditional."),
                (n, "no_difference", "guidance is uncond + s * (cond - uncond): you wrote uncond + s * cond."),
                (n, "swapped", "cond and uncond are swapped: the FIRST half of the batch holds the real labels (cond), "
                 "the second the null label (uncond)."),
                (n, "from_cond", "start from the unconditional prediction: uncond + s * (cond - uncond), not "
                 "cond + s * (cond - uncond)."),
                (n, "full_x", "the reference reads only the first half of x and runs it twice ([x_half, x_half]); you "
                 "ran the whole x (the sampler passes [z, z], so the two agree there, but not in general)."),
            ]  # fmt: skip
            with torch.no_grad():
                for nn_, how, hint in variants:
                    if nn_ > model.out_channels:
                        continue
                    if checks.matches(gt, _cfg_variant(model, x, t, y, s, nn_, how), atol=1e-5):
                        return hint
            return (
                "no known slip matches: one forward pass of the first half of x, twice; the conditional and "
                "unconditional predictions are the two halves of its output; guide the first n channels only."
            )

        try:
            checks.expect_close(ex, got, expected, atol=1e-5, rtol=1e-5, diagnose=diagnose, what="outputs")
        except ExerciseFailed as e:
            raise ExerciseFailed(f"{e}{where}") from None
    checks.passed(ex)


# --------------------------------------------------------------------------
# Exercise 4.5 (load_official)
# --------------------------------------------------------------------------

_LOAD_MODEL = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=10)

_CANARY = {"ran": False}


def _canary() -> dict:
    """Called only if a checkpoint is unpickled with full pickle: what an attacker's code would do, harmlessly."""
    _CANARY["ran"] = True
    return {}


class _CodeInPickle:
    """An object that full pickle rebuilds by calling ``_canary()``: it stands for arbitrary code in a file."""

    def __reduce__(self):
        return (_canary, ())


class _RecordLoads:
    """Patch ``torch.load`` to record the ``weights_only`` argument of every call."""

    def __init__(self):
        self.calls: list[object] = []

    def __enter__(self):
        self._orig = torch.load

        def load(*args, **kwargs):
            self.calls.append(kwargs.get("weights_only", "missing"))
            return self._orig(*args, **kwargs)

        torch.load = load
        return self

    def __exit__(self, *exc):
        torch.load = self._orig


def check_load_official(fn) -> None:
    """``fn(model, path)`` loads a reference-layout checkpoint file into ``model`` safely and strictly."""
    ex = "4.5 (load_official)"
    released = random_dit(80, **_LOAD_MODEL)
    other = random_dit(81, **_LOAD_MODEL)  # the raw (non-EMA) weights of a training checkpoint
    sd, raw = released.state_dict(), other.state_dict()
    x, t, y = _inputs(released, 2, seed=9)
    with torch.no_grad():
        expected, raw_out = released(x, t, y), other(x, t, y)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        files = {
            "a bare reference state dict": sd,
            'a training checkpoint {"model", "ema", "opt", "args"}': {
                "model": raw, "ema": sd, "opt": {"state": {}, "param_groups": []}, "args": {"model": "DiT-Ti/2"}
            },
            'a state dict saved from a DDP-wrapped model ("module." prefixes)': {
                f"module.{k}": v for k, v in sd.items()
            },
        }  # fmt: skip
        for n, (what, obj) in enumerate(files.items()):
            path = tmp / f"ckpt{n}.pt"
            save_checkpoint(obj, path)
            model = _fresh_dit(**_LOAD_MODEL).eval()
            with torch.no_grad():
                fresh_out = model(x, t, y)
            with _RecordLoads() as rec:
                try:
                    returned = fn(model, path)
                except NotImplementedError:
                    checks.fail(ex, "not implemented yet: replace the `raise NotImplementedError(...)` line with your "
                                "code.")  # fmt: skip
                except ExerciseFailed:
                    raise
                except Exception as e:
                    hint = ""
                    if "module." in str(e):
                        hint = (
                            " Strip the 'module.' prefix that DistributedDataParallel adds to every key before loading."
                        )
                    elif "ema" in str(e) or "opt" in str(e) or "args" in str(e):
                        hint = ' Unwrap training checkpoints: take their "ema" weights when present, else "model".'
                    checks.fail(ex, f"on {what}: " + _raised(e) + hint)
            if not rec.calls:
                checks.fail(ex, "the check saw no call of torch.load: read the file with torch.load, in its safe "
                            "mode (or with minidit.checkpoint.read_file).")  # fmt: skip
            if any(w is not True for w in rec.calls):
                w = next(w for w in rec.calls if w is not True)
                detail = "without weights_only" if w == "missing" else f"with weights_only={w!r}"
                checks.fail(
                    ex, f"you called torch.load {detail}: pass weights_only=True explicitly. Full pickle can run any "
                    "code stored in the file (the reference release loads that way); weights_only=True is the default "
                    "only since torch 2.6.",
                )  # fmt: skip
            if returned is not None and returned is not model:
                checks.fail(ex, "return the model you loaded into (or nothing), not a new object.")
            with torch.no_grad():
                got = model(x, t, y)
            if not torch.equal(got, expected):
                if torch.equal(got, raw_out):
                    hint = 'you loaded the raw "model" weights: prefer "ema" (the averaged weights samplers use).'
                elif torch.equal(got, fresh_out):
                    hint = (
                        "nothing was loaded: the model still has its fresh weights. With strict=False, keys that "
                        "do not fit (a 'module.' prefix, a wrapper dict) are silently skipped: use strict=True."
                    )
                else:
                    hint = "the loaded weights are not the checkpoint's."
                checks.fail(ex, f"on {what}: outputs differ from the checkpoint's model: {hint}")
        # Strictness: a checkpoint with a key too many, or one missing, must be refused loudly.
        for what, bad in (
            ("an unexpected key ('blocks.9.attn.qkv.weight')", {**sd, "blocks.9.attn.qkv.weight": sd["pos_embed"]}),
            ("a missing key ('pos_embed')", {k: v for k, v in sd.items() if k != "pos_embed"}),
        ):
            path = tmp / "bad.pt"
            save_checkpoint(bad, path)
            model = _fresh_dit(**_LOAD_MODEL).eval()
            try:
                fn(model, path)
            except (ExerciseFailed, NotImplementedError):
                raise
            except Exception:
                continue
            checks.fail(
                ex,
                f"a checkpoint with {what} loaded without an error: load with strict=True, so that a checkpoint "
                "of another architecture fails loudly instead of leaving weights untouched.",
            )
        # Safety: a file that runs code when fully unpickled must be refused, and must not run.
        path = tmp / "code.pt"
        torch.save({"ema": sd, "note": _CodeInPickle()}, path)
        _CANARY["ran"] = False
        refused = False
        try:
            fn(_fresh_dit(**_LOAD_MODEL).eval(), path)
        except (ExerciseFailed, NotImplementedError):
            raise
        except Exception:
            refused = True
        if _CANARY["ran"]:
            checks.fail(ex, "loading a checkpoint ran code stored in it (full pickle): use torch.load(..., "
                        "weights_only=True).")  # fmt: skip
        if not refused:
            checks.fail(ex, "a checkpoint holding a non-tensor Python object was accepted: load with "
                        "weights_only=True, which refuses it.")  # fmt: skip
    checks.passed(ex)
