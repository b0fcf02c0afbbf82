"""Lesson 04 (the full DiT and its zoo): each check passes the reference answer, fails the stub, and rejects
plausible mistakes with the hint that names them."""

import math

import pytest
import torch
from torch import nn

from minidit.checkpoint import read_file
from minidit.course import lesson04
from minidit.course.checks import ExerciseFailed
from minidit.embed import get_2d_sincos_pos_embed, unpatchify
from minidit.stats import model_stats


def stub(*args, **kwargs):
    raise NotImplementedError("Exercise 4.x: replace this line with your code")


def passes(check, fn, label, capsys):
    check(fn)
    assert capsys.readouterr().out.splitlines() == [f"✅ Exercise {label} passed"]


def rejects(check, fn, *hints):
    with pytest.raises(ExerciseFailed) as e:
        check(fn)
    for hint in hints:
        assert hint in str(e.value), str(e.value)
    return str(e.value)


# --------------------------------------------------------------------------
# 4.1 (dit_forward)
# --------------------------------------------------------------------------


def dit_forward(model, x, t, y):
    x = model.x_embedder(x) + model.pos_embed
    c = model.t_embedder(t) + model.y_embedder(y, model.training)
    for block in model.blocks:
        x = block(x, c)
    return model.unpatchify(model.final_layer(x, c))


def forward_no_pos(model, x, t, y):
    x = model.x_embedder(x)
    c = model.t_embedder(t) + model.y_embedder(y, model.training)
    for block in model.blocks:
        x = block(x, c)
    return model.unpatchify(model.final_layer(x, c))


def forward_t_only(model, x, t, y):
    x = model.x_embedder(x) + model.pos_embed
    c = model.t_embedder(t)
    for block in model.blocks:
        x = block(x, c)
    return model.unpatchify(model.final_layer(x, c))


def forward_in_channels(model, x, t, y):
    x = model.x_embedder(x) + model.pos_embed
    c = model.t_embedder(t) + model.y_embedder(y, model.training)
    for block in model.blocks:
        x = block(x, c)
    return unpatchify(model.final_layer(x, c), model.patch_size, model.in_channels)


def forward_never_drops(model, x, t, y):
    x = model.x_embedder(x) + model.pos_embed
    c = model.t_embedder(t) + model.y_embedder(y, False)
    for block in model.blocks:
        x = block(x, c)
    return model.unpatchify(model.final_layer(x, c))


def forward_tokens(model, x, t, y):
    x = model.x_embedder(x) + model.pos_embed
    c = model.t_embedder(t) + model.y_embedder(y, model.training)
    for block in model.blocks:
        x = block(x, c)
    return model.final_layer(x, c)


def forward_calls_model(model, x, t, y):
    return model(x, t, y)


def forward_blocks_twice(model, x, t, y):
    x = model.x_embedder(x) + model.pos_embed
    c = model.t_embedder(t) + model.y_embedder(y, model.training)
    for block in list(model.blocks) * 2:
        x = block(x, c)
    return model.unpatchify(model.final_layer(x, c))


FORWARD_MUTANTS = [
    ("no pos_embed", forward_no_pos, ("you forgot the position table",)),
    ("c = t_embedder(t) only", forward_t_only, ("the condition ignores the label",)),
    ("unpatchify with in_channels", forward_in_channels, ("instead of out_channels (2C = 8)",)),
    ("labels never dropped in training", forward_never_drops, ("labels are never dropped in training mode",)),
    ("returns the tokens", forward_tokens, ("You returned the tokens: unpatchify them",)),
    ("calls model(...)", forward_calls_model, ("build the forward from the model's submodules",)),
    ("numpy result", lambda m, x, t, y: dit_forward(m, x, t, y).numpy(), ("should be a torch.Tensor",)),
    ("the blocks run twice", forward_blocks_twice, ("no known slip matches", "every block once")),
]


def test_dit_forward(capsys):
    passes(lesson04.check_dit_forward, dit_forward, "4.1 (dit_forward)", capsys)
    rejects(lesson04.check_dit_forward, stub, "not implemented yet")
    for _, fn, hints in FORWARD_MUTANTS:
        rejects(lesson04.check_dit_forward, fn, *hints)


def test_the_checks_leave_the_global_rng_alone():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    lesson04.check_dit_forward(dit_forward)
    assert torch.equal(torch.get_rng_state(), before)


# --------------------------------------------------------------------------
# 4.2 (initialize_weights)
# --------------------------------------------------------------------------


def initialize_weights(model):
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            nn.init.zeros_(module.bias)
    w = model.x_embedder.proj.weight.data
    nn.init.xavier_uniform_(w.view(w.shape[0], -1))
    nn.init.zeros_(model.x_embedder.proj.bias)
    nn.init.normal_(model.y_embedder.embedding_table.weight, std=0.02)
    nn.init.normal_(model.t_embedder.mlp[0].weight, std=0.02)
    nn.init.normal_(model.t_embedder.mlp[2].weight, std=0.02)
    for block in model.blocks:
        nn.init.zeros_(block.adaLN_modulation[-1].weight)
        nn.init.zeros_(block.adaLN_modulation[-1].bias)
    nn.init.zeros_(model.final_layer.adaLN_modulation[-1].weight)
    nn.init.zeros_(model.final_layer.adaLN_modulation[-1].bias)
    nn.init.zeros_(model.final_layer.linear.weight)
    nn.init.zeros_(model.final_layer.linear.bias)
    pos = get_2d_sincos_pos_embed(model.hidden_size, model.x_embedder.grid_size)
    model.pos_embed.data.copy_(torch.from_numpy(pos).float().unsqueeze(0))


def variant_init(**changes):
    """The correct init with one step changed."""

    def init(model):
        initialize_weights(model)
        if changes.get("final_not_zero"):
            nn.init.xavier_uniform_(model.final_layer.linear.weight)
        if changes.get("adaln_not_zero"):
            for block in model.blocks:
                nn.init.xavier_uniform_(block.adaLN_modulation[-1].weight)
        if changes.get("conv_4d"):
            nn.init.xavier_uniform_(model.x_embedder.proj.weight)
        if changes.get("conv_default"):
            model.x_embedder.proj.reset_parameters()
            nn.init.zeros_(model.x_embedder.proj.bias)
        if changes.get("xavier_normal"):
            for block in model.blocks:
                nn.init.xavier_normal_(block.attn.qkv.weight)
        if changes.get("table_default"):
            nn.init.normal_(model.y_embedder.embedding_table.weight)
        if changes.get("t_mlp_xavier"):
            nn.init.xavier_uniform_(model.t_embedder.mlp[0].weight)
        if changes.get("no_pos"):
            model.pos_embed.data.zero_()
        if changes.get("pos_swapped"):
            D = model.hidden_size
            pos = model.pos_embed.data.clone()
            model.pos_embed.data.copy_(torch.cat([pos[..., D // 2 :], pos[..., : D // 2]], dim=-1))

    return init


def init_keeps_biases(model):
    saved = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("bias")}
    initialize_weights(model)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.startswith("blocks.") and "adaLN" not in n and n.endswith("bias"):
                p.copy_(saved[n])


def init_table_after_t_mlp(model):  # the right draws, in another order: t_embedder before the label table
    initialize_weights(model)
    torch.manual_seed(3)  # the check seeds the global RNG with 3: replay the draws in the wrong order
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
    w = model.x_embedder.proj.weight.data
    nn.init.xavier_uniform_(w.view(w.shape[0], -1))
    nn.init.normal_(model.t_embedder.mlp[0].weight, std=0.02)
    nn.init.normal_(model.t_embedder.mlp[2].weight, std=0.02)
    nn.init.normal_(model.y_embedder.embedding_table.weight, std=0.02)
    for block in model.blocks:
        nn.init.zeros_(block.adaLN_modulation[-1].weight)
    nn.init.zeros_(model.final_layer.adaLN_modulation[-1].weight)
    nn.init.zeros_(model.final_layer.linear.weight)


def init_conv_twice(model):  # Xavier on the 4-D weight, then (correctly) on the view: one draw too many
    nn.init.xavier_uniform_(model.x_embedder.proj.weight)
    initialize_weights(model)


def init_linears_reversed(model):  # every Linear Xavier-uniform, but the last one first
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    initialize_weights(model)
    torch.manual_seed(3)
    for module in reversed(linears):
        nn.init.xavier_uniform_(module.weight)
    w = model.x_embedder.proj.weight.data
    nn.init.xavier_uniform_(w.view(w.shape[0], -1))
    nn.init.normal_(model.y_embedder.embedding_table.weight, std=0.02)
    nn.init.normal_(model.t_embedder.mlp[0].weight, std=0.02)
    nn.init.normal_(model.t_embedder.mlp[2].weight, std=0.02)
    for block in model.blocks:
        nn.init.zeros_(block.adaLN_modulation[-1].weight)
    nn.init.zeros_(model.final_layer.adaLN_modulation[-1].weight)
    nn.init.zeros_(model.final_layer.linear.weight)


def init_own_generator(model):  # the right distributions from a private generator: other numbers
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)
        initialize_weights(model)


INIT_MUTANTS = [
    ("final Linear not zero", variant_init(final_not_zero=True), ("final_layer.linear.weight should be exactly zero",
                                                                  "output")),
    ("adaLN regressors not zero", variant_init(adaln_not_zero=True),
     ("adaLN-Zero: zero the last Linear of every block",)),
    ("Xavier on the 4-D conv weight", variant_init(conv_4d=True), ("you applied xavier_uniform_ to the 4-D conv weight",
                                                                   "D*p*p = 1024")),
    ("PyTorch's default conv init", variant_init(conv_default=True), ("too small: is this PyTorch's default init",)),
    ("xavier_normal_", variant_init(xavier_normal=True), ("xavier_normal_ (or randn) instead of xavier_uniform_",)),
    ("label table N(0, 1)", variant_init(table_default=True), ("nn.Embedding's own default is N(0, 1)",)),
    ("timestep MLP Xavier", variant_init(t_mlp_xavier=True), ("t_embedder.mlp.0.weight", "normal_(w, std=0.02)")),
    ("no pos_embed", variant_init(no_pos=True), ("pos_embed is not the fixed 2-D sin-cos table",)),
    ("pos_embed halves swapped", variant_init(pos_swapped=True), ("the halves are swapped",)),
    ("block biases kept", init_keeps_biases, ("Every Linear's bias starts at zero",)),
    ("label table drawn after the timestep MLP", init_table_after_t_mlp,
     ("has the right distribution but not the reference's numbers", "(4) the label table")),
    ("conv initialised twice", init_conv_twice, ("one draw too many",)),
    ("Linears in reverse order", init_linears_reversed, ("in the order model.modules() visits them",)),
    ("a private generator", init_own_generator, ("not the reference's numbers",)),
]  # fmt: skip


def test_initialize_weights(capsys):
    check = lesson04.check_initialize_weights
    passes(check, initialize_weights, "4.2 (initialize_weights)", capsys)
    rejects(check, stub, "not implemented yet")
    for _, fn, hints in INIT_MUTANTS:
        rejects(check, fn, *hints)


def test_initialize_weights_matches_the_reference_model_init():
    """The exercise's answer and DiT.initialize_weights draw the same numbers from the same seed."""
    torch.manual_seed(0)
    a = lesson04.DiT(input_size=8, patch_size=2, hidden_size=32, depth=2, num_heads=2, num_classes=5)
    b = lesson04.DiT(input_size=8, patch_size=2, hidden_size=32, depth=2, num_heads=2, num_classes=5)
    torch.manual_seed(1)
    a.initialize_weights()
    torch.manual_seed(1)
    initialize_weights(b)
    for (n, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), n


# --------------------------------------------------------------------------
# 4.3 (count_params_and_macs)
# --------------------------------------------------------------------------


def count_params_and_macs(
    depth, hidden_size, patch_size, input_size=32, in_channels=4, num_classes=1000, learn_sigma=True, **mistakes
):
    N, D, p, C, K = depth, hidden_size, patch_size, in_channels, num_classes
    T = (input_size // p) ** 2
    out = 2 * C if learn_sigma and not mistakes.get("out_c") else C
    params = (0 if mistakes.get("no_pos") else T * D) + C * p * p * D + D  # pos_embed, x_embedder
    params += 256 * D + D + D * D + D  # t_embedder
    params += (K + (0 if mistakes.get("no_null") else 1)) * D  # y_embedder
    params += N * (3 * D * D + 3 * D + D * D + D + 4 * D * D + 4 * D + 4 * D * D + D + 6 * D * D + 6 * D)
    params += 2 * D * D + 2 * D + D * p * p * out + p * p * out  # final_layer
    attn = 0 if mistakes.get("no_attn") else 2 * T * T * D
    macs = T * C * p * p * D + 256 * D + D * D + N * (6 * D * D + 12 * T * D * D + attn) + 2 * D * D
    macs += T * D * p * p * out
    if mistakes.get("flops"):
        macs *= 2
    return params, macs / 1e9


def counts_with(**mistakes):
    return lambda *a, **k: count_params_and_macs(*a, **k, **mistakes)


def counts_float(*args, **kwargs):  # T = (input_size / p) ** 2: a float count
    params, gmacs = count_params_and_macs(*args, **kwargs)
    return float(params), gmacs


def counts_final_ada_per_token(*args, **kwargs):
    params, gmacs = count_params_and_macs(*args, **kwargs)
    cfg = dict(zip(("depth", "hidden_size", "patch_size", "input_size"), args), **kwargs)
    T, D = (cfg.get("input_size", 32) // cfg["patch_size"]) ** 2, cfg["hidden_size"]
    return params, gmacs + (T - 1) * 2 * D * D / 1e9


COUNT_MUTANTS = [
    ("FLOPs, not MACs", counts_with(flops=True), ("you counted FLOPs",)),
    ("no attention matmuls", counts_with(no_attn=True), ("you left out the attention matmuls",)),
    ("no pos_embed", counts_with(no_pos=True), ("you left out pos_embed", "675,129,632")),
    ("K rows, no null row", counts_with(no_null=True), ("num_classes + 1 rows",)),
    ("final Linear to C, not 2C", counts_with(out_c=True), ("out_channels = 2C when learn_sigma",)),
    ("params as a float", counts_float, ("params is a float", "//")),
    ("the final layer's regressor run per token", counts_final_ada_per_token, ("no single known slip", "term by term")),
]


def test_count_params_and_macs(capsys):
    check = lesson04.check_count_params_and_macs
    passes(check, count_params_and_macs, "4.3 (count_params_and_macs)", capsys)
    rejects(check, stub, "not implemented yet")
    for _, fn, hints in COUNT_MUTANTS:
        rejects(check, fn, *hints)


def test_known_stats_are_what_model_stats_measures():
    for name, (cfg, params, gmacs) in lesson04.KNOWN_STATS.items():
        measured = lesson04.measure(cfg)
        assert measured == (params, pytest.approx(gmacs, rel=1e-9)), name
        assert count_params_and_macs(**cfg) == (params, pytest.approx(gmacs, rel=1e-9)), name
    s = model_stats("DiT-XL/2")
    assert (s.params, s.trainable_params) == (675_129_632, 674_834_720)


# --------------------------------------------------------------------------
# 4.4 (forward_with_cfg)
# --------------------------------------------------------------------------


def forward_with_cfg(model, x, t, y, cfg_scale, guided_channels=3, how="ok", half_out=False):
    half = x[: len(x) // 2]
    out = model(torch.cat([half, half]) if how != "full_x" else x, t, y)
    n = model.in_channels if guided_channels is None else guided_channels
    eps, rest = out[:, :n], out[:, n:]
    cond, uncond = eps.chunk(2)
    guided = uncond + cfg_scale * cond if how == "no_difference" else uncond + cfg_scale * (cond - uncond)
    if how == "swapped":
        guided = cond + cfg_scale * (uncond - cond)
    eps = torch.cat([guided, guided])
    result = torch.cat([eps, rest], dim=1)
    return result[: len(x) // 2] if half_out else result


def cfg_all_by_default(model, x, t, y, s, guided_channels=None):
    return forward_with_cfg(model, x, t, y, s, guided_channels)


def cfg_guides_variance(model, x, t, y, s, guided_channels=3):
    return forward_with_cfg(model, x, t, y, s, model.out_channels if guided_channels is None else guided_channels)


CFG_MUTANTS = [
    ("all 4 channels by default", cfg_all_by_default, ("you guided all 4 epsilon channels by default", "GLIDE")),
    ("uncond + s * cond", lambda *a, **k: forward_with_cfg(*a, **k, how="no_difference"),
     ("you wrote uncond + s * cond",)),
    ("cond and uncond swapped", lambda *a, **k: forward_with_cfg(*a, **k, how="swapped"),
     ("cond and uncond are swapped",)),
    ("returns one half", lambda *a, **k: forward_with_cfg(*a, **k, half_out=True), ("You returned one half",)),
    ("runs the whole x", lambda *a, **k: forward_with_cfg(*a, **k, how="full_x"), ("reads only the first half of x",)),
    ("variance channels guided", cfg_guides_variance, ("you guided the variance channels too",)),
    ("calls model.forward_with_cfg", lambda m, *a, **k: m.forward_with_cfg(*a, **k), ("write the guidance yourself",)),
    ("numpy result", lambda *a, **k: forward_with_cfg(*a, **k).numpy(), ("should be a torch.Tensor",)),
    ("guidance scale doubled", lambda m, x, t, y, s, **k: forward_with_cfg(m, x, t, y, 2 * s, **k),
     ("no known slip matches",)),
]  # fmt: skip


def test_forward_with_cfg(capsys):
    check = lesson04.check_forward_with_cfg
    passes(check, forward_with_cfg, "4.4 (forward_with_cfg)", capsys)
    rejects(check, stub, "not implemented yet")
    for _, fn, hints in CFG_MUTANTS:
        rejects(check, fn, *hints)


# --------------------------------------------------------------------------
# 4.5 (load_official)
# --------------------------------------------------------------------------


def load_official(model, path, prefer_ema=True, strip=True, strict=True, weights_only=True):
    obj = torch.load(path, map_location="cpu", weights_only=weights_only)
    if prefer_ema and isinstance(obj.get("ema"), dict):
        obj = obj["ema"]
    elif isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if strip:
        obj = {k.removeprefix("module."): v for k, v in obj.items()}
    model.load_state_dict(obj, strict=strict)
    return model


def load_with_read_file(model, path):
    obj = read_file(path)
    obj = obj.get("ema", obj)
    model.load_state_dict({k.removeprefix("module."): v for k, v in obj.items()})


def load_implicit(model, path):
    model.load_state_dict(torch.load(path)["ema"] if "ema" in torch.load(path) else torch.load(path))


def load_no_unwrap(model, path):
    obj = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict({k.removeprefix("module."): v for k, v in obj.items()})


def load_safetensors(model, path):
    from safetensors.torch import load_file

    model.load_state_dict(load_file(path))


def load_returns_copy(model, path):
    import copy

    return load_official(copy.deepcopy(model), path)


LOAD_MUTANTS = [
    ("weights_only=False", lambda m, p: load_official(m, p, weights_only=False), ("with weights_only=False",)),
    ("weights_only not passed", load_implicit, ("without weights_only: pass weights_only=True explicitly",)),
    ('raw "model" weights', lambda m, p: load_official(m, p, prefer_ema=False), ('prefer "ema"',)),
    ("'module.' kept", lambda m, p: load_official(m, p, strip=False), ("Strip the 'module.' prefix",)),
    ("'module.' kept, strict=False", lambda m, p: load_official(m, p, strip=False, strict=False),
     ("nothing was loaded", "strict=True")),
    ("strict=False", lambda m, p: load_official(m, p, strict=False),
     ("loaded without an error: load with strict=True",)),
    ("training checkpoint not unwrapped", load_no_unwrap,
     ('{"model", "ema", "opt", "args"}', 'take their "ema" weights')),
    ("another file format", load_safetensors, ("raised",)),
    ("returns a new model", load_returns_copy, ("return the model you loaded into",)),
]  # fmt: skip


def test_load_official(capsys):
    check = lesson04.check_load_official
    passes(check, load_official, "4.5 (load_official)", capsys)
    passes(check, load_with_read_file, "4.5 (load_official)", capsys)
    rejects(check, stub, "not implemented yet")
    for _, fn, hints in LOAD_MUTANTS:
        rejects(check, fn, *hints)


def test_full_pickle_runs_the_canary_and_the_check_says_so():
    """Without the explicit-argument check, a loader using full pickle is caught by the canary itself."""

    def full_pickle(model, path):
        obj = torch.load(path, weights_only=False)
        obj = obj.get("ema", obj)
        model.load_state_dict({k.removeprefix("module."): v for k, v in obj.items()})

    lesson04._CANARY["ran"] = False
    with pytest.raises(ExerciseFailed, match="weights_only"):
        lesson04.check_load_official(full_pickle)
    with pytest.raises(ExerciseFailed, match="ran code stored in it"):
        # the canary part on its own: the first calls are made with weights_only=True, the canary file without
        calls = {"n": 0}

        def sneaky(model, path):
            calls["n"] += 1
            if "code" in str(path):
                return full_pickle(model, path)
            return load_official(model, path)

        lesson04.check_load_official(sneaky)


def test_random_dit_is_seeded_and_not_zero():
    a = lesson04.random_dit(1, input_size=8, patch_size=2, hidden_size=32, depth=1, num_heads=2, num_classes=5)
    b = lesson04.random_dit(1, input_size=8, patch_size=2, hidden_size=32, depth=1, num_heads=2, num_classes=5)
    x = torch.randn(2, 4, 8, 8)
    t, y = torch.tensor([3, 500]), torch.tensor([0, 4])
    with torch.no_grad():
        out = a(x, t, y)
    assert torch.equal(out, b(x, t, y).detach())
    assert out.abs().mean() > 0.1 and math.isfinite(out.abs().max().item())


MUTANTS = {  # exercise -> [(mistake, function, hint keywords)], for the course's mutant table
    "4.1 (dit_forward)": FORWARD_MUTANTS,
    "4.2 (initialize_weights)": INIT_MUTANTS,
    "4.3 (count_params_and_macs)": COUNT_MUTANTS,
    "4.4 (forward_with_cfg)": CFG_MUTANTS,
    "4.5 (load_official)": LOAD_MUTANTS,
}
CHECKS = {
    "4.1 (dit_forward)": lesson04.check_dit_forward,
    "4.2 (initialize_weights)": lesson04.check_initialize_weights,
    "4.3 (count_params_and_macs)": lesson04.check_count_params_and_macs,
    "4.4 (forward_with_cfg)": lesson04.check_forward_with_cfg,
    "4.5 (load_official)": lesson04.check_load_official,
}
