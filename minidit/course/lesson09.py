"""Checks for lesson 09: making it fast (attention memory, FlashAttention's tiled forward, loss scaling).

Each ``check_<name>(fn)`` calls the learner's function on seeded inputs, compares it with the
reference (``minidit.attention.math_attention`` / ``tiled_attention``, ``torch.amp.GradScaler`` on
the CPU), prints one line on success, or raises ``AssertionError`` naming the likely mistake.

Also here, for the lesson's measurements: ``LargestTensor``, a dispatch mode that records the
largest tensor any operation creates (deterministic on a CPU, unlike a process's RSS), and
``saved_bytes``, the bytes autograd saves for the backward pass.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from minidit.attention import math_attention
from minidit.attention import tiled_attention as tiled_attention_reference  # noqa: F401  (for the lesson and tests)

from . import checks

# --------------------------------------------------------------------------
# Measuring memory on a CPU, deterministically
# --------------------------------------------------------------------------


class LargestTensor(TorchDispatchMode):
    """Inside ``with LargestTensor() as meter:``, every tensor an operation returns is seen;
    ``meter.bytes`` / ``meter.shape`` are those of the largest (views of an input count as their own size)."""

    def __init__(self):
        super().__init__()
        self.bytes, self.shape, self.numel = 0, (), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.numel() * t.element_size() > self.bytes:
                self.bytes, self.shape, self.numel = t.numel() * t.element_size(), tuple(t.shape), t.numel()
        return out


def saved_bytes(fn: Callable[[], torch.Tensor], exclude: set[int] = frozenset()) -> int:
    """Bytes of the distinct storages autograd saves for backward while ``fn()`` runs, leaving out the
    storages whose ``data_ptr()`` is in ``exclude`` (e.g. the weights, which exist anyway)."""
    storages: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in exclude:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


# --------------------------------------------------------------------------
# Exercise 9.1 (score_bytes)
# --------------------------------------------------------------------------

SCORE_BYTES = "9.1 (score_bytes)"


def check_score_bytes(fn) -> None:
    """Exercise 9.1: ``fn(B, H, T, dtype)`` -> int, the bytes of one [B, H, T, T] score matrix in ``dtype``."""
    ex = SCORE_BYTES
    cases = [(2, 3, 17, torch.float32), (256, 16, 256, torch.float32), (8, 16, 1024, torch.bfloat16),
             (1, 6, 64, torch.float16), (3, 1, 5, torch.float64)]  # fmt: skip
    for B, H, T, dtype in cases:
        got = checks.call(ex, fn, B, H, T, dtype)
        size = torch.empty((), dtype=dtype).element_size()
        expected = B * H * T * T * size
        if isinstance(got, torch.Tensor) or not isinstance(got, int) or isinstance(got, bool):
            if isinstance(got, (float, torch.Tensor)) and float(got) == expected:
                checks.fail(ex, f"got {got!r} ({type(got).__name__}), the right number but not an int: "
                            "a byte count is a whole number; return a Python int.")  # fmt: skip
            checks.fail(ex, f"should return a Python int, got {type(got).__name__}.")
        if got == expected:
            continue
        wrong = {
            B * T * T * size: "you left out the heads: every head has its own T x T score matrix.",
            B * H * T * size: "the score matrix is T x T per head and image: T², not T.",
            H * T * T * size: "you left out the batch: every image has its own score matrices.",
            B * H * T * T * size * 8: "that is bits: an element of this dtype takes element_size() bytes, not bits.",
            B * H * T * T * 4: f"{dtype} does not take 4 bytes per element: ask the dtype (torch.finfo(dtype).bits "
            "// 8, or torch.empty((), dtype=dtype).element_size()).",
            B * H * T * T: "you counted elements, not bytes: multiply by the bytes per element of the dtype.",
        }  # fmt: skip
        hint = wrong.get(got, "")
        checks.fail(ex, f"for B={B}, H={H}, T={T}, {dtype}: got {got:,} bytes, expected {expected:,}. {hint}".strip())
    # the formula against a measurement: the largest tensor the math attention creates
    q = torch.zeros(2, 3, 40, 8)
    with LargestTensor() as meter:
        math_attention(q, q, q)
    if meter.bytes != fn(2, 3, 40, torch.float32):
        checks.fail(ex, f"the largest tensor math attention creates is {meter.bytes:,} bytes {meter.shape}.")
    checks.passed(ex)


# --------------------------------------------------------------------------
# Exercise 9.2 (tiled_attention)
# --------------------------------------------------------------------------

TILED = "9.2 (tiled_attention)"


def _tiled_variant(q, k, v, block, rescale=True, tile_max=False, normalise_per_tile=False, scale=True,
                   subtract_max=True, drop_ragged=False):  # fmt: skip
    """A tiled forward in float64 with one mistake switched on (for naming the learner's)."""
    q, k, v = q.double(), k.double(), v.double()
    q = q / math.sqrt(q.shape[-1]) if scale else q
    T, S = q.shape[-2], k.shape[-2]
    out = torch.zeros(*q.shape[:-1], v.shape[-1], dtype=torch.float64)
    stop_q = T - T % block if drop_ragged and T % block else T
    stop_k = S - S % block if drop_ragged and S % block else S
    for i in range(0, stop_q, block):
        qi = q[..., i : i + block, :]
        m = qi.new_full((*qi.shape[:-1], 1), -math.inf)
        row_sum = qi.new_zeros(*qi.shape[:-1], 1)
        acc = qi.new_zeros(*qi.shape[:-1], v.shape[-1])
        for j in range(0, stop_k, block):
            s = qi @ k[..., j : j + block, :].transpose(-2, -1)
            tile_m = s.amax(-1, keepdim=True)
            m_new = torch.maximum(m, tile_m) if subtract_max else torch.zeros_like(m)
            p = torch.exp(s - (tile_m if tile_max else m_new))
            c = torch.exp(m - m_new) if rescale and subtract_max else torch.ones_like(m)
            pv = p @ v[..., j : j + block, :]
            if normalise_per_tile:
                pv = pv / p.sum(-1, keepdim=True)
            row_sum = c * row_sum + p.sum(-1, keepdim=True)
            acc = c * acc + pv
            m = m_new
        out[..., i : i + block, :] = acc if normalise_per_tile else acc / row_sum
    return out


def _tiled_mistakes(q, k, v, block):
    return [
        (_tiled_variant(q, k, v, block, rescale=False), "when a key tile raises the running max m, what was summed "
         "so far (the running sum l and the accumulator) was computed under the OLD max: multiply both by "
         "exp(m_old - m_new) before adding the new tile."),
        (_tiled_variant(q, k, v, block, tile_max=True), "you subtracted the TILE's max from the scores: p must use "
         "the running max m_new = max(m_old, tile max), the one l and the accumulator are kept under."),
        (_tiled_variant(q, k, v, block, normalise_per_tile=True), "you normalised each tile by its own sum: keep "
         "the accumulator unnormalised and divide by the running sum l once, after the last key tile."),
        (_tiled_variant(q, k, v, block, scale=False), "you left out the 1/√d scale of the scores (d = head width)."),
        (_tiled_variant(q, k, v, block, drop_ragged=True), "the last tile is shorter when T is not a multiple of "
         "block_size: slicing [i : i + block_size] handles it, a loop that stops at the last full tile drops rows "
         "or keys."),
    ]  # fmt: skip


def check_tiled_attention(fn) -> None:
    """Exercise 9.2: ``fn(q, k, v, block_size)`` -> [B, H, T, d] like q, equal to math attention, without a
    T x T score matrix."""
    ex = TILED
    g = checks.seeded(92)
    cases = [  # (B, H, T, d, block, dtype, score scale): ragged ends, a single tile, large scores
        (2, 3, 37, 8, 8, torch.float64, 1.0),
        (1, 2, 50, 16, 16, torch.float32, 1.0),
        (2, 1, 12, 4, 32, torch.float64, 1.0),
        (1, 2, 24, 16, 8, torch.float32, 40.0),
    ]
    for B, H, T, d, block, dtype, big in cases:
        q = (torch.randn(B, H, T, d, generator=g, dtype=torch.float64) * big).to(dtype)
        k, v = (torch.randn(B, H, T, d, generator=g, dtype=torch.float64).to(dtype) for _ in range(2))
        args = [q.clone(), k.clone(), v.clone()]
        got = checks.expect_tensor(ex, checks.call(ex, fn, *args, block))
        if any(not torch.equal(a, b) for a, b in zip(args, (q, k, v))):
            checks.fail(ex, "your function changed q, k or v in place: compute new tensors instead.")
        checks.expect_shape(ex, got, (B, H, T, d))
        checks.expect_dtype(ex, got, dtype, "return the result in q's dtype (accumulate in float32 or float64 "
                            "if you like, then cast back): the DiT's layers after attention expect it.")  # fmt: skip
        expected = math_attention(q.double(), k.double(), v.double())
        if not torch.isfinite(got).all():
            checks.fail(ex, f"your result has inf/nan ({dtype}, scores in the hundreds): exp() of a large score "
                        "overflows; subtract the running row max m before exp (the online softmax).")  # fmt: skip
        atol = 1e-10 if dtype == torch.float64 else 1e-5
        mistakes = _tiled_mistakes(q, k, v, block)

        def diagnose(got, mistakes=mistakes, case=(B, H, T, d, block, dtype)):
            for variant, hint in mistakes:
                if checks.matches(got, variant, atol=1e-4):
                    return hint
            return f"(case: [B, H, T, d] = {list(case[:4])}, block_size = {case[4]}, {case[5]})"

        checks.expect_close(ex, got, expected, atol=atol, rtol=atol, diagnose=diagnose)
    # memory: the largest tensor it creates must be a tile, not a T x T score matrix
    B, H, T, d, block = 2, 2, 96, 8, 16
    q, k, v = (torch.randn(B, H, T, d, generator=g) for _ in range(3))
    with LargestTensor() as meter:
        checks.call(ex, fn, q, k, v, block)
    if meter.numel >= T * T:
        checks.fail(ex, f"right values, but your function created a tensor of shape {list(meter.shape)} "
                    f"({meter.numel:,} elements) for T = {T}, block_size = {block}: at least as large as a whole "
                    f"T x T score matrix. Work tile by tile: scores of one query tile against one key tile, "
                    f"[B, H, block, block], are all FlashAttention ever holds.")  # fmt: skip
    if meter.numel > B * H * max(T * d, block * block):  # larger than the output and than one tile of scores
        checks.fail(ex, f"right values, but your function created a tensor of shape {list(meter.shape)} for "
                    f"[B, H, T, d] = {[B, H, T, d]}, block_size = {block}: a strip of scores, larger than one "
                    "[B, H, block, block] tile (and than the output). Loop over query tiles AND key tiles: each "
                    "query tile walks the keys tile by tile with its running max, sum and accumulator.")  # fmt: skip
    checks.passed(ex)


# --------------------------------------------------------------------------
# Exercise 9.3 (scaler_step)
# --------------------------------------------------------------------------

SCALER = "9.3 (scaler_step)"


def _params(optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def reference_scaler_step(optimizer, scale, growth_tracker, max_norm=None, growth_factor=2.0, backoff_factor=0.5,
                          growth_interval=2000):  # fmt: skip
    """What ``GradScaler.unscale_ / step / update`` do, with the scale and tracker as plain numbers."""
    params = [p for p in _params(optimizer) if p.grad is not None]
    for p in params:
        p.grad.mul_(1.0 / scale)
    finite = all(bool(torch.isfinite(p.grad).all()) for p in params)
    if not finite:
        return scale * backoff_factor, 0, False
    if max_norm is not None:
        nn.utils.clip_grad_norm_(params, max_norm)
    optimizer.step()
    growth_tracker += 1
    if growth_tracker == growth_interval:
        return scale * growth_factor, 0, True
    return scale, growth_tracker, True


def _scenario(steps: int, inf_steps: set[int], seed: int):
    """Seeded inputs for a run: a Linear model's initial state, and one (x, target) per step."""
    g = checks.seeded(seed)
    model = nn.Linear(6, 3)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    data = [(torch.randn(8, 6, generator=g), torch.randn(8, 3, generator=g) * 3) for _ in range(steps)]
    return model.state_dict(), data


def _backward(model, x, target, scale, poison):
    """Backward of the scaled loss; ``scale`` is a number or a GradScaler (which scales it itself)."""
    loss = (model(x) - target).pow(2).mean()
    (scale.scale(loss) if isinstance(scale, torch.amp.GradScaler) else loss * scale).backward()
    if poison:  # as an fp16 overflow would: one gradient entry is inf (or nan)
        model.weight.grad[0, 0] = poison


def check_scaler_step(fn) -> None:
    """Exercise 9.3: ``fn(optimizer, scale, growth_tracker, max_norm, growth_factor, backoff_factor,
    growth_interval)`` -> (new_scale, new_growth_tracker, stepped), run against ``torch.amp.GradScaler("cpu")``."""
    ex = SCALER
    runs = [  # (steps, {step: poison}, max_norm, growth_interval, backoff)
        (9, {2: math.inf, 6: math.nan}, 0.5, 3, 0.5),
        (6, {0: -math.inf}, None, 2, 0.25),
    ]
    for run, (steps, poison, max_norm, interval, backoff) in enumerate(runs):
        state, data = _scenario(steps, set(poison), seed=93 + run)
        mine, ref = nn.Linear(6, 3), nn.Linear(6, 3)
        mine.load_state_dict(state)
        ref.load_state_dict(state)
        opt_mine = torch.optim.SGD(mine.parameters(), lr=0.1)
        opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1)
        init = 2.0**10
        scaler = torch.amp.GradScaler("cpu", init_scale=init, growth_factor=2.0, backoff_factor=backoff,
                                      growth_interval=interval)  # fmt: skip
        scale, tracker = init, 0
        for step, (x, target) in enumerate(data):
            where = f"(step {step}; growth_interval={interval}, backoff_factor={backoff}, max_norm={max_norm})"
            before = [p.detach().clone() for p in mine.parameters()]
            opt_mine.zero_grad()
            _backward(mine, x, target, scale, poison.get(step))
            scaled_grads = [p.grad.clone() for p in mine.parameters()]
            got = checks.call(ex, fn, opt_mine, scale, tracker, max_norm, 2.0, backoff, interval)
            opt_ref.zero_grad()
            _backward(ref, x, target, scaler, poison.get(step))
            scaler.unscale_(opt_ref)
            if max_norm is not None:
                nn.utils.clip_grad_norm_(ref.parameters(), max_norm)
            scaler.step(opt_ref)
            scaler.update()
            exp_scale, exp_tracker = scaler.get_scale(), int(scaler._get_growth_tracker())
            exp_stepped = step not in poison
            if not (isinstance(got, tuple) and len(got) == 3):
                checks.fail(ex, f"return a tuple (new_scale, new_growth_tracker, stepped), got {got!r}.")
            new_scale, new_tracker, stepped = got
            if isinstance(new_scale, torch.Tensor) or isinstance(new_tracker, torch.Tensor):
                checks.fail(ex, "return the scale and the tracker as Python numbers (float, int), not tensors.")
            if not isinstance(stepped, bool):
                checks.fail(ex, f"`stepped` should be a bool, got {type(stepped).__name__}.")
            params = [p.detach() for p in mine.parameters()]
            if not exp_stepped:
                if stepped or any(not torch.equal(a, b) for a, b in zip(before, params)):
                    checks.fail(ex, f"a gradient was inf/nan and you still stepped {where}: check every grad "
                                "(torch.isfinite) after unscaling and skip optimizer.step() when any is not finite; "
                                "the overflow said the scale is too large, not that the update is right.")  # fmt: skip
            elif not stepped:
                checks.fail(ex, f"all grads were finite but you returned stepped=False {where}.")
            for got_p, ref_p in zip(params, ref.parameters()):
                if torch.allclose(got_p, ref_p.detach(), atol=1e-6, rtol=1e-5):
                    continue
                hint = _param_hint(before, scaled_grads, scale, max_norm, params)
                checks.fail(ex, f"the parameters after the step differ from GradScaler's {where}. {hint}".strip())
            if new_scale != exp_scale:
                checks.fail(ex, f"new scale {new_scale:g}, expected {exp_scale:g} {where}. "
                            + _scale_hint(scale, new_scale, exp_stepped, backoff, tracker, interval))  # fmt: skip
            if new_tracker != exp_tracker:
                checks.fail(ex, f"new growth_tracker {new_tracker}, expected {exp_tracker} {where}. "
                            + _tracker_hint(exp_stepped, tracker, new_tracker, interval))  # fmt: skip
            scale, tracker = new_scale, new_tracker
    checks.passed(ex)


def _param_hint(before, scaled_grads, scale, max_norm, params) -> str:
    """Which wrong order of unscale / clip / step gives the learner's parameters."""

    def sgd(grads):
        return [p - 0.1 * g for p, g in zip(before, grads)]

    def clipped(grads):
        holders = [nn.Parameter(p.clone()) for p in before]
        for h, g in zip(holders, grads):
            h.grad = g.clone()
        if max_norm is not None:
            nn.utils.clip_grad_norm_(holders, max_norm)
        return [h.grad for h in holders]

    unscaled = [g / scale for g in scaled_grads]
    candidates = [
        (sgd(scaled_grads), "you stepped with the SCALED gradients: divide every grad by the scale (unscale) "
         "before clipping and stepping, or the update is `scale` times too large."),
        (sgd([g / scale for g in clipped(scaled_grads)]), "you clipped before unscaling: the norm of the scaled "
         "grads is `scale` times too large, so clipping shrinks them far too much. Unscale first, then clip."),
        (sgd(unscaled), "you did not clip: with max_norm given, clip the unscaled grads to that total norm "
         "(torch.nn.utils.clip_grad_norm_) before stepping."),
    ]  # fmt: skip
    for candidate, hint in candidates:
        if all(torch.allclose(a, b, atol=1e-6, rtol=1e-5) for a, b in zip(params, candidate)):
            return hint
    return ""


def _scale_hint(scale, new_scale, stepped, backoff, tracker, interval) -> str:
    if not stepped:
        if new_scale == scale:
            return "After an overflow (inf/nan grads) the scale must shrink: multiply it by backoff_factor."
        if new_scale == scale / backoff:
            return "You divided by backoff_factor (it is < 1): multiply by it to shrink the scale."
        return "After an overflow, new scale = scale × backoff_factor."
    if new_scale == scale and tracker + 1 == interval:
        return ("The scale grows after growth_interval successful steps IN A ROW: count this step first "
                "(tracker + 1), and when that reaches growth_interval, multiply by growth_factor and reset the "
                "tracker to 0.")  # fmt: skip
    if new_scale > scale and tracker + 1 < interval:
        return (f"You grew the scale too early: only {tracker + 1} successful step(s) in a row, and it grows at "
                f"growth_interval = {interval}.")  # fmt: skip
    return ""


def _tracker_hint(stepped, tracker, new_tracker, interval) -> str:
    if not stepped:
        return "An overflow resets the count of successful steps: the tracker goes back to 0."
    if tracker + 1 == interval:
        return "When the scale grows, the tracker starts counting again from 0."
    return "Each successful step adds 1 to the tracker."
