"""minidit.video: toy videos, spacetime patches, the video DiT, the scorer, and the shipped checkpoint."""

import numpy as np
import pytest
import torch
from conftest import perturbed

from minidit import embed, rundir, toy, video
from minidit.errors import UserError
from minidit.flow import FlowMatching


def tiny_model(**kw):
    torch.manual_seed(0)
    args = dict(frames=4, image_size=8, tubelet=2, patch_size=4, hidden_size=32, depth=2, num_heads=2)
    return video.VideoDiT(**{**args, **kw})


# -- spacetime patches ---------------------------------------------------------------------------------


def test_patchify_spacetime_round_trip_and_token_order():
    x = torch.randn(2, 3, 4, 8, 12, generator=torch.Generator().manual_seed(0))
    pt, p = 2, 4
    tokens = video.patchify_spacetime(x, pt, p)
    f, h, w = 2, 2, 3
    assert tokens.shape == (2, f * h * w, pt * p * p * 3)
    assert torch.equal(video.unpatchify_spacetime(tokens, pt, p, 3, (f, h, w)), x)
    for i, r, c in [(0, 0, 0), (0, 1, 2), (1, 0, 1), (1, 1, 2)]:  # time-major, then rows, then columns
        tube = x[:, :, i * pt : (i + 1) * pt, r * p : (r + 1) * p, c * p : (c + 1) * p]  # [B, C, pt, p, p]
        expected = tube.permute(0, 2, 3, 4, 1).reshape(2, -1)  # (frame, row, column, channel): channels last
        assert torch.equal(tokens[:, (i * h + r) * w + c], expected)


def test_patchify_spacetime_with_one_frame_is_embed_patchify():
    x = torch.randn(2, 3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    assert torch.equal(video.patchify_spacetime(x, 1, 4), embed.patchify(x[:, :, 0], 4))


def test_patchify_spacetime_rejects_sizes_that_do_not_split():
    with pytest.raises(ValueError, match="tubelets"):
        video.patchify_spacetime(torch.zeros(1, 3, 5, 8, 8), 2, 4)
    with pytest.raises(ValueError, match="grid"):
        video.unpatchify_spacetime(torch.zeros(1, 7, 96), 2, 4, 3, (2, 2, 2))


def test_spacetime_patch_embed_is_a_linear_on_tubelets():
    torch.manual_seed(0)
    embedder = video.SpacetimePatchEmbed(frames=4, image_size=8, tubelet=2, patch_size=4, in_chans=3, embed_dim=16)
    x = torch.randn(2, 3, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    weight = embedder.proj.weight.permute(0, 2, 3, 4, 1).reshape(16, -1)  # [D, C, pt, p, p] -> [D, pt*p*p*C]
    linear = video.patchify_spacetime(x, 2, 4) @ weight.T + embedder.proj.bias
    out = embedder(x)
    assert out.shape == (2, embedder.num_patches, 16) and embedder.grid == (2, 2, 2)
    torch.testing.assert_close(out, linear, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="expected videos"):
        embedder(torch.zeros(1, 3, 2, 8, 8))


def test_3d_pos_embed_splits_time_and_space():
    D, f, h = 64, 3, 2
    table = video.get_3d_sincos_pos_embed(D, f, h, h)
    assert table.shape == (f * h * h, D) and table.dtype == np.float64
    spatial = embed.get_2d_sincos_pos_embed(3 * D // 4, h)
    for i in range(f):
        for s in range(h * h):
            row = table[i * h * h + s]  # token (time i, spatial position s): time-major order
            np.testing.assert_array_equal(row[: D // 4], embed.get_1d_sincos_pos_embed(D // 4, np.array([i]))[0])
            np.testing.assert_array_equal(row[D // 4 :], spatial[s])
    # time 0: sin(0) = 0 then cos(0) = 1 on the first D/4 channels; time 1, first channel: sin(1 * omega_0) = sin 1
    np.testing.assert_array_equal(table[0, : D // 4], [0.0] * (D // 8) + [1.0] * (D // 8))
    assert table[h * h, 0] == np.sin(1.0)
    with pytest.raises(ValueError, match="divisible by 16"):
        video.get_3d_sincos_pos_embed(40, 2, 2, 2)
    with pytest.raises(ValueError, match="square"):
        video.get_3d_sincos_pos_embed(32, 2, 2, 3)


# -- toy videos ------------------------------------------------------------------------------------------


def test_make_batch_is_a_pure_function_of_seed_and_index():
    videos, labels = video.make_batch(torch.tensor([7, 3, 11]), 0)
    assert videos.shape == (3, 3, 8, 16, 16) and videos.dtype == torch.float32 and labels.dtype == torch.int64
    assert videos.min() >= -1 and videos.max() <= 1
    alone, label = video.make_batch(torch.tensor([3]), 0)
    assert torch.equal(alone[0], videos[1]) and label[0] == labels[1]  # the same video in any batch
    other, _ = video.make_batch(torch.tensor([7, 3, 11]), 1)
    assert not torch.equal(other, videos)  # another seed, another dataset
    long, _ = video.make_batch(torch.tensor([7]), 0, frames=16, image_size=32)
    assert long.shape == (1, 3, 16, 32, 32)


def test_make_batch_covers_every_class_and_keeps_the_shape_in_frame():
    videos, labels = video.make_batch(torch.arange(400), 0)
    assert torch.bincount(labels, minlength=8).min() >= 30 and labels.max() < video.NUM_CLASSES
    params = video.video_params(torch.arange(400), 0)
    reach = params["centres"].abs() + params["radius"][:, None, None]  # [N, F, 2]: the shape's farthest extent
    assert reach.max() <= 1 - toy.MARGIN + 1e-6  # inside every frame, toy's margin from the border
    corners = videos[..., [0, 0, -1, -1], [0, -1, 0, -1]]
    assert (corners - (toy.BACKGROUND * 2 - 1)).abs().max() < 1e-6
    assert len(video.CLASS_NAMES) == 8 and video.CLASS_NAMES[0] == "red moving right"


def test_frames_are_drawn_by_the_toy_renderer():
    params = video.video_params(torch.tensor([5]), 0)
    videos, _ = video.make_batch(torch.tensor([5]), 0)
    frame = {"label": params["shape"], "radius": params["radius"], "centre": params["centres"][:, 3],
             "rotation": torch.tensor([[1.0, 0.0]]), "colour": params["colour"]}  # fmt: skip
    assert torch.equal(videos[:, :, 3], toy.render(frame, 16))


# -- the scorer ------------------------------------------------------------------------------------------


def test_score_is_perfect_on_real_videos():
    videos, labels = video.make_batch(torch.arange(400), 3)
    result = video.score(videos, labels)
    assert (result["direction"], result["colour"], result["both"], result["coherent"]) == (1.0, 1.0, 1.0, 1.0)
    assert 0.5 < result["speed"] < 1.0  # 4 - 6.4 px over 7 frames
    reversed_ = video.motion_direction(videos.flip(2))  # played backwards: right <-> left, down <-> up
    assert torch.equal(reversed_, (labels % 4) ^ 1)


def test_score_is_at_most_chance_on_noise_and_rejects_still_or_fading_shapes():
    videos, labels = video.make_batch(torch.arange(200), 0)
    noise = torch.randn(videos.shape, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
    result = video.score(noise, labels)
    assert result["direction"] <= 0.3 and 0.35 < result["colour"] < 0.65 and result["coherent"] == 0
    still = videos[:, :, :1].expand_as(videos)  # the first frame held: no motion
    assert (video.motion_direction(still) == -1).all() and video.score(still, labels)["direction"] == 0
    fading = videos.clone()
    fading[:, :, -1] = toy.BACKGROUND * 2 - 1  # the shape vanishes in the last frame
    assert video.score(fading, labels)["coherent"] == 0


# -- the model -------------------------------------------------------------------------------------------


def test_fresh_video_dit_outputs_zero_and_has_the_image_dits_parts():
    from minidit.model import DiTBlock, FinalLayer

    model = tiny_model()
    x = torch.randn(2, 3, 4, 8, 8)
    out = model(x, torch.tensor([10.0, 500.0]), torch.tensor([0, 7]))
    assert out.shape == x.shape and torch.equal(out, torch.zeros_like(x))  # adaLN-Zero
    assert isinstance(model.blocks[0], DiTBlock) and isinstance(model.final_layer, FinalLayer)
    assert model.pos_embed.shape == (1, 8, 32) and not model.pos_embed.requires_grad
    expected = video.get_3d_sincos_pos_embed(32, 2, 2, 2)
    torch.testing.assert_close(model.pos_embed[0], torch.from_numpy(expected).float())


def test_video_dit_output_follows_the_token_layout():
    """The final layer's token values land where unpatchify_spacetime puts them: one tubelet per token."""
    model = perturbed(tiny_model()).eval()
    x = torch.randn(1, 3, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    t, y = torch.tensor([300.0]), torch.tensor([2])
    tokens = model.x_embedder(x) + model.pos_embed
    c = model.t_embedder(t) + model.y_embedder(y, False)
    for block in model.blocks:
        tokens = block(tokens, c)
    expected = model.final_layer(tokens, c)  # [1, T, pt*p*p*C]
    with torch.no_grad():
        torch.testing.assert_close(video.patchify_spacetime(model(x, t, y), 2, 4), expected)


def test_cfg_scale_one_equals_the_conditional_model():
    model = perturbed(tiny_model()).eval()
    x = torch.randn(3, 3, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    t, y = torch.full((6,), 400.0), torch.tensor([1, 5, 7, 8, 8, 8])
    with torch.no_grad():
        guided = model.forward_with_cfg(torch.cat([x, x]), t, y, cfg_scale=1.0, guided_channels=None)
        cond = model(x, t[:3], y[:3])
        uncond = model(x, t[:3], y[3:])
        strong = model.forward_with_cfg(torch.cat([x, x]), t, y, cfg_scale=3.0, guided_channels=None)
    torch.testing.assert_close(guided[:3], cond, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(strong[:3], uncond + 3 * (cond - uncond), atol=1e-5, rtol=1e-5)
    assert (cond - uncond).abs().max() > 1e-3  # the label matters, so the comparisons mean something


def test_flow_matching_on_videos():
    """FlowMatching broadcasts t over 5-D tensors: x_t and the loss are per video."""
    flow = FlowMatching()
    x0 = torch.randn(2, 3, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    eps = torch.randn(2, 3, 4, 8, 8, generator=torch.Generator().manual_seed(6))
    t = torch.tensor([0.25, 1.0])
    xt = flow.q_sample(x0, t, eps)
    torch.testing.assert_close(xt[0], 0.75 * x0[0] + 0.25 * eps[0])
    torch.testing.assert_close(xt[1], eps[1])
    model = tiny_model()  # outputs 0: the loss is mean((eps - x0)^2) per video
    loss = flow.training_losses(model, x0, t, dict(y=torch.tensor([0, 1])), eps)["loss"]
    torch.testing.assert_close(loss, ((eps - x0) ** 2).mean(dim=(1, 2, 3, 4)))


def test_generate_is_per_sample_and_cfg_one_is_unguided():
    model = perturbed(tiny_model()).eval()
    labels = torch.tensor([0, 3, 6])
    both = video.generate(model, labels, cfg_scale=2.0, num_steps=3, seed=0)
    one = video.generate(model, labels[1:2], cfg_scale=2.0, num_steps=3, seed=0, indices=torch.tensor([1]))
    assert both.shape == (3, 3, 4, 8, 8) and both.abs().max() <= 1
    torch.testing.assert_close(one[0], both[1], atol=1e-5, rtol=1e-5)  # the same noise in any batch
    plain = video.generate(model, labels, cfg_scale=1.0, num_steps=3, seed=0)
    assert not torch.allclose(plain, both)
    with pytest.raises(UserError, match="labels"):
        video.generate(model, torch.tensor([8]), num_steps=1)


# -- training, export, loading ---------------------------------------------------------------------------

TINY = dict(frames=4, image_size=8, tubelet=2, patch_size=4, hidden_size=32, depth=1, num_heads=2, batch_size=4,
            save_every=2, log_every=2)  # fmt: skip


def test_training_resumes_exactly_and_exports_a_loadable_file(tmp_path):
    straight = video.train(tmp_path / "a", steps=4, **TINY)
    video.train(tmp_path / "b", steps=2, **TINY)
    video.train(tmp_path / "b", steps=4, **TINY)  # the same command again continues from step 2
    a = torch.load(tmp_path / "a" / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "checkpoints" / "last.pt", weights_only=True)
    assert straight["step"] == a["step"] == b["step"] == 4
    for key in a["ema"]:
        assert torch.equal(a["ema"][key], b["ema"][key]), key
    with pytest.raises(UserError, match="different video run"):
        video.train(tmp_path / "a", steps=4, **{**TINY, "batch_size": 8})
    fd = rundir.lock(tmp_path / "a")  # another trainer holds the run directory
    try:
        with pytest.raises(UserError, match="in use by another training process"):
            video.train(tmp_path / "a", steps=6, **TINY)
    finally:
        rundir.unlock(fd)
    out = video.export_video_dit(tmp_path / "a", tmp_path / "v.safetensors")
    model, config = video.load_video_dit(out)
    assert not model.training and config["step"] == 4 and config["class_names"] == video.CLASS_NAMES
    for key, value in model.state_dict().items():
        expected = a["ema"][key] if key == "pos_embed" else a["ema"][key].half().float()
        assert torch.equal(value, expected), key


def test_missing_or_foreign_checkpoint_is_one_line(tmp_path):
    with pytest.raises(UserError, match="python -m minidit.video train"):
        video.load_video_dit(tmp_path / "none.safetensors")
    toy.save_grid(torch.zeros(1, 3, 8, 8), tmp_path / "x.png")
    with pytest.raises(UserError, match="not a video run directory"):
        video.export_video_dit(tmp_path, tmp_path / "v.safetensors")
    with pytest.raises(UserError, match="not a toy video DiT"):
        video.load_video_dit(toy.DEFAULT_CLASSIFIER)


def test_cli_bad_option_and_preview(tmp_path, capsys):
    from minidit.errors import run_cli

    assert run_cli(video.main, ["train", "--stesp", "3"]) == 2
    assert "did you mean --steps" in capsys.readouterr().err
    assert run_cli(video.main, ["eval", "--cfg-scale", "nan"]) == 2
    assert "argument --cfg-scale: must be a finite number >= 0" in capsys.readouterr().err
    assert run_cli(video.main, ["train", "--hidden-size", "40", "--run-dir", str(tmp_path / "r")]) == 2
    assert "multiple of 16" in capsys.readouterr().err and not (tmp_path / "r").exists()
    assert run_cli(video.main, ["preview", "--out", str(tmp_path / "p.png"), "--per-class", "1"]) == 0
    assert (tmp_path / "p.png").stat().st_size > 0


# -- the shipped checkpoint ------------------------------------------------------------------------------

shipped = pytest.mark.skipif(not video.DEFAULT_VIDEO_DIT.is_file(), reason="data/toy_video_dit.safetensors not built")


@shipped
def test_shipped_video_dit_loads_strictly():
    model, config = video.load_video_dit()
    assert not model.training and next(model.parameters()).dtype == torch.float32
    assert (config["frames"], config["image_size"], config["tubelet"], config["patch_size"]) == (8, 16, 2, 4)
    assert (config["step"], config["batch_size"], config["seed"]) == (3000, 32, 0)  # the run data/README.md records
    assert video.DEFAULT_VIDEO_DIT.stat().st_size < 4 * 2**20


@shipped
def test_shipped_video_dit_moves_the_asked_way():
    model, _ = video.load_video_dit()
    labels = torch.arange(8)  # every colour x direction once
    samples = video.generate(model, labels, cfg_scale=4.0, num_steps=25, seed=0)
    # Measured when the file was made: 8 of 8 in direction, colour and coherence (and 200 of 200 in
    # benchmarks/results/video-2026-12-01.md); one slip is allowed for another machine's float rounding.
    assert (video.motion_direction(samples) == labels % 4).sum() >= 7
    assert (video.colour_of(samples) == labels // 4).sum() >= 7
    assert video.score(samples, labels)["coherent"] >= 7 / 8


def test_make_batch_takes_toys_argument_order_and_refuses_float_indices():
    videos, labels = video.make_batch(torch.arange(3), seed=0)
    assert torch.equal(videos, video.make_batch([0, 1, 2])[0])
    with pytest.raises(ValueError, match="1-D integer"):
        video.make_batch(torch.tensor([2.7]))


def test_export_refuses_a_run_of_another_trainer(tmp_path):
    """A minidit.train run (no frames, tubelet, ... in its config) was a KeyError traceback."""
    (tmp_path / "checkpoints").mkdir()
    torch.save({"config": {"model": "DiT-Ti/4"}, "ema": {"w": torch.zeros(1)}, "step": 3},
               tmp_path / "checkpoints" / "last.pt")  # fmt: skip
    with pytest.raises(UserError, match="not a video run directory .*no frames"):
        video.export_video_dit(tmp_path, tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()
