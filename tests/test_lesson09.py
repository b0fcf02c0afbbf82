"""The checks of lesson 09 are real: right answers pass with one line, stubs fail, and the usual
mistakes are each rejected with the hint that names them.

The right answers and the mistakes are written here by hand (FlashAttention's Algorithm 1, GradScaler's
documented semantics), not taken from minidit, so a check that compared minidit with itself would not pass.
"""

import math

import pytest
import torch
from exercises import assert_fails, assert_passes, stub
from torch import nn

from minidit.course import lesson09

# --------------------------------------------------------------------------
# 9.1 (score_bytes)
# --------------------------------------------------------------------------

SIZES = {torch.float64: 8, torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}


def score_bytes(B, H, T, dtype):
    return B * H * T * T * SIZES[dtype]


def score_bytes_finfo(B, H, T, dtype):
    return B * H * T**2 * torch.finfo(dtype).bits // 8


SCORE_MISTAKES = {
    "no heads": (lambda B, H, T, dt: B * T * T * SIZES[dt], "left out the heads"),
    "T not squared": (lambda B, H, T, dt: B * H * T * SIZES[dt], "T², not T"),
    "no batch": (lambda B, H, T, dt: H * T * T * SIZES[dt], "left out the batch"),
    "bits": (lambda B, H, T, dt: B * H * T * T * torch.finfo(dt).bits, "that is bits"),
    "always 4 bytes": (lambda B, H, T, dt: B * H * T * T * 4, "does not take 4 bytes"),
    "elements": (lambda B, H, T, dt: B * H * T * T, "counted elements, not bytes"),
    "float": (lambda B, H, T, dt: float(score_bytes(B, H, T, dt)), "return a Python int"),
    "tensor": (lambda B, H, T, dt: torch.tensor(score_bytes(B, H, T, dt)), "return a Python int"),
}


@pytest.mark.parametrize("fn", [score_bytes, score_bytes_finfo])
def test_score_bytes_right_answers_pass(fn, capsys):
    assert_passes(lesson09.check_score_bytes, fn, "9.1 (score_bytes)", capsys)


def test_score_bytes_stub_fails():
    assert_fails(lesson09.check_score_bytes, stub, "9.1 (score_bytes)", "not implemented yet")


@pytest.mark.parametrize("name", SCORE_MISTAKES)
def test_score_bytes_mistakes_are_named(name):
    fn, hint = SCORE_MISTAKES[name]
    assert_fails(lesson09.check_score_bytes, fn, "9.1 (score_bytes)", hint)


def test_largest_tensor_of_math_attention_is_the_score_matrix():
    q = torch.zeros(2, 3, 40, 8)
    with lesson09.LargestTensor() as meter:
        lesson09.math_attention(q, q, q)
    assert meter.shape[-2:] == (40, 40) and meter.bytes == 2 * 3 * 40 * 40 * 4


# --------------------------------------------------------------------------
# 9.2 (tiled_attention)
# --------------------------------------------------------------------------


def tiled(q, k, v, block_size, rescale=True, tile_max=False, per_tile=False, scale=True, subtract_max=True,
          full_tiles_only=False, out_dtype=None, acc=None):  # fmt: skip
    """FlashAttention's forward (Dao et al. 2022, Alg. 1) by hand; each keyword switches on one mistake."""
    dtype = q.dtype
    if acc is not None:
        q, k, v = q.to(acc), k.to(acc), v.to(acc)
    d, T = q.shape[-1], q.shape[-2]
    out = torch.zeros_like(q)
    last = T - T % block_size if full_tiles_only else T
    for i in range(0, last, block_size):
        qi = q[:, :, i : i + block_size] * (d**-0.5 if scale else 1.0)
        m = torch.full(qi.shape[:-1] + (1,), -math.inf, dtype=q.dtype)
        total = torch.zeros(qi.shape[:-1] + (1,), dtype=q.dtype)
        o = torch.zeros_like(qi)
        for j in range(0, last, block_size):
            s = qi @ k[:, :, j : j + block_size].transpose(-1, -2)
            if not subtract_max:
                p = s.exp()
                total, o = total + p.sum(-1, keepdim=True), o + p @ v[:, :, j : j + block_size]
                continue
            m_new = torch.maximum(m, s.max(-1, keepdim=True).values)
            p = (s - (s.max(-1, keepdim=True).values if tile_max else m_new)).exp()
            c = (m - m_new).exp() if rescale else 1.0
            pv = p @ v[:, :, j : j + block_size]
            if per_tile:
                pv = pv / p.sum(-1, keepdim=True)
            total, o, m = c * total + p.sum(-1, keepdim=True), c * o + pv, m_new
        out[:, :, i : i + block_size] = o if per_tile else o / total
    return out.to(out_dtype or dtype)


def full_softmax(q, k, v, block_size):
    """Right values, but the whole T x T matrix at once."""
    return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), -1) @ v


def query_tiles_only(q, k, v, block_size):
    """Right values, tiled over the queries only: each tile's scores against all T keys, a [.., block, T] strip."""
    out = torch.empty_like(q)
    for i in range(0, q.shape[-2], block_size):
        out[:, :, i : i + block_size] = full_softmax(q[:, :, i : i + block_size], k, v, block_size)
    return out


TILED_MISTAKES = {
    "no rescaling": (lambda q, k, v, b: tiled(q, k, v, b, rescale=False), "exp(m_old - m_new)"),
    "tile max": (lambda q, k, v, b: tiled(q, k, v, b, tile_max=True), "TILE's max"),
    "normalised per tile": (lambda q, k, v, b: tiled(q, k, v, b, per_tile=True), "divide by the running sum l once"),
    "no 1/sqrt(d)": (lambda q, k, v, b: tiled(q, k, v, b, scale=False), "1/√d"),
    "ragged end dropped": (lambda q, k, v, b: tiled(q, k, v, b, full_tiles_only=True), "the last tile is shorter"),
    "returns float64": (lambda q, k, v, b: tiled(q, k, v, b, acc=torch.float64, out_dtype=torch.float64),
                        "return the result in q's dtype"),
    "no max subtracted": (lambda q, k, v, b: tiled(q, k, v, b, subtract_max=False), "subtract the running row max"),
    "full T x T matrix": (full_softmax, "at least as large as a whole T x T score matrix"),
    "query tiles only": (query_tiles_only, "Loop over query tiles AND key tiles"),
    "numpy": (lambda q, k, v, b: tiled(q, k, v, b).numpy(), "should be a torch.Tensor"),
}  # fmt: skip


@pytest.mark.parametrize(
    "fn", [tiled, lambda q, k, v, b: tiled(q, k, v, b, acc=torch.float64), lesson09.tiled_attention_reference]
)
def test_tiled_attention_right_answers_pass(fn, capsys):
    assert_passes(lesson09.check_tiled_attention, fn, "9.2 (tiled_attention)", capsys)


def test_tiled_attention_stub_fails():
    assert_fails(lesson09.check_tiled_attention, stub, "9.2 (tiled_attention)", "not implemented yet")


@pytest.mark.parametrize("name", TILED_MISTAKES)
def test_tiled_attention_mistakes_are_named(name):
    fn, hint = TILED_MISTAKES[name]
    assert_fails(lesson09.check_tiled_attention, fn, "9.2 (tiled_attention)", hint)


def test_tiled_attention_in_place_edit_is_named():
    def in_place(q, k, v, b):
        out = tiled(q, k, v, b)
        q.zero_()
        return out

    assert_fails(lesson09.check_tiled_attention, in_place, "9.2 (tiled_attention)", "changed q, k or v in place")


# --------------------------------------------------------------------------
# 9.3 (scaler_step)
# --------------------------------------------------------------------------


def scaler_step(optimizer, scale, tracker, max_norm=None, growth_factor=2.0, backoff_factor=0.5,
                growth_interval=2000, unscale=True, clip_first=False, skip_inf=True, grow_at=0, backoff="mul",
                reset=True, clip=True):  # fmt: skip
    """GradScaler's unscale_ / step / update by hand; each keyword switches on one mistake."""
    params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    if clip_first and max_norm is not None:
        torch.nn.utils.clip_grad_norm_(params, max_norm)
    if unscale:
        for p in params:
            p.grad /= scale
    finite = all(torch.isfinite(p.grad).all() for p in params)
    if not finite and skip_inf:
        new = scale * backoff_factor if backoff == "mul" else scale / backoff_factor if backoff == "div" else scale
        return new, 0 if reset else tracker, False
    if max_norm is not None and clip and not clip_first:
        torch.nn.utils.clip_grad_norm_(params, max_norm)
    optimizer.step()
    if not finite:
        return scale * backoff_factor, 0, True
    tracker += 1
    if grow_at is not None and tracker == growth_interval + grow_at:
        return scale * growth_factor, 0, True
    return scale, tracker, True


SCALER_MISTAKES = {
    "no unscale": (dict(unscale=False), "stepped with the SCALED gradients"),
    "clip before unscale": (dict(clip_first=True), "clipped before unscaling"),
    "no clipping": (dict(clip=False), "you did not clip"),
    "steps on inf": (dict(skip_inf=False), "still stepped"),
    "never grows": (dict(grow_at=None), "IN A ROW"),
    "grows one step late": (dict(grow_at=1), "IN A ROW"),
    "grows one step early": (dict(grow_at=-1), "grew the scale too early"),
    "divides by backoff": (dict(backoff="div"), "divided by backoff_factor"),
    "no backoff": (dict(backoff="none"), "must shrink"),
    "tracker not reset": (dict(reset=False), "goes back to 0"),
}


@pytest.mark.parametrize("fn", [scaler_step, lesson09.reference_scaler_step])
def test_scaler_step_right_answers_pass(fn, capsys):
    assert_passes(lesson09.check_scaler_step, fn, "9.3 (scaler_step)", capsys)


def test_scaler_step_stub_fails():
    assert_fails(lesson09.check_scaler_step, stub, "9.3 (scaler_step)", "not implemented yet")


@pytest.mark.parametrize("name", SCALER_MISTAKES)
def test_scaler_step_mistakes_are_named(name):
    kwargs, hint = SCALER_MISTAKES[name]

    def fn(*args):
        return scaler_step(*args, **kwargs)

    assert_fails(lesson09.check_scaler_step, fn, "9.3 (scaler_step)", hint)


def test_scaler_step_return_types():
    def tensor_scale(*args):
        s, t, ok = scaler_step(*args)
        return torch.tensor(s), t, ok

    assert_fails(lesson09.check_scaler_step, tensor_scale, "9.3 (scaler_step)", "Python numbers")


def test_reference_scaler_step_matches_torch_grad_scaler():
    """The reference (used in the lesson's prose) follows GradScaler step by step, overflow included."""
    torch.manual_seed(0)
    a, b = nn.Linear(3, 2), nn.Linear(3, 2)
    b.load_state_dict(a.state_dict())
    oa, ob = torch.optim.SGD(a.parameters(), lr=0.1), torch.optim.SGD(b.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0, growth_interval=2)
    scale, tracker = 8.0, 0
    for step in range(6):
        x = torch.randn(4, 3)
        oa.zero_grad(), ob.zero_grad()
        (a(x).sum() * scale).backward()
        scaler.scale(b(x).sum()).backward()
        if step == 3:
            a.weight.grad[0, 0] = b.weight.grad[0, 0] = math.inf
        scale, tracker, _ = lesson09.reference_scaler_step(oa, scale, tracker, growth_interval=2)
        scaler.step(ob)
        scaler.update()
        assert (scale, tracker) == (scaler.get_scale(), int(scaler._get_growth_tracker()))
        torch.testing.assert_close(a.weight, b.weight)
