"""Tests of minidit.captions: toy captions, the tokenizer, PixArt-α's and MMDiT's blocks, the caption DiTs,
and the shipped checkpoints (which must draw what their captions ask for)."""

from __future__ import annotations

import pytest
import torch

from minidit import captions as C
from minidit import toy
from minidit.errors import UserError, run_cli

D, H = 32, 4


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- data and tokens ---------------------------------------------------------------------------------------------


def test_caption_words_and_partial_captions():
    assert C.caption({"colour": 0, "shape": 0, "size": 0, "position": 0}) == "a small red circle at the top"
    assert C.caption({"size": "large", "colour": "blue", "shape": "triangle", "position": "right"}) == (
        "a large blue triangle on the right"
    )
    assert C.caption({"colour": 1}) == "a green shape"
    with pytest.raises(UserError, match="unknown attribute 'hue'"):
        C.caption({"hue": 0})
    with pytest.raises(UserError, match="colour must be one of red, green, blue"):
        C.caption({"colour": "purple"})
    with pytest.raises(UserError, match="size must be one of"):
        C.caption({"size": 2})


def test_make_batch_is_a_pure_function_of_seed_and_index():
    images, captions, attrs = C.make_batch(torch.arange(20), 0)
    assert images.shape == (20, 3, 16, 16) and images.dtype == torch.float32
    assert images.min() >= -1 and images.max() <= 1
    assert set(attrs) == set(C.ATTRIBUTES) and all(v.shape == (20,) for v in attrs.values())
    assert captions == C.captions_of(attrs)
    again, captions2, _ = C.make_batch(torch.tensor([19, 3, 7]), 0)
    assert torch.equal(again, images[[19, 3, 7]]) and captions2 == [captions[i] for i in (19, 3, 7)]
    other, _, _ = C.make_batch(torch.arange(20), 1)
    assert not torch.equal(other, images)


def test_images_show_their_attributes():
    """Independent facts of the rendering: the shape's pixels have the caption's colour, sit on the caption's side,
    and a large shape covers more pixels than a small one of its kind."""
    images, _, attrs = C.make_batch(torch.arange(200), 0, image_size=32)
    rgb = (images + 1) / 2
    ink = (rgb - toy.BACKGROUND).abs().amax(dim=1) > 0.3  # [N, S, S] shape pixels
    area = ink.flatten(1).sum(1).float()
    for n in range(200):
        colour = rgb[n][:, ink[n]].mean(dim=1)
        assert colour.argmax() == [0, 1, 2][attrs["colour"][n]]  # red, green, blue: the brightest channel
        rows, cols = ink[n].nonzero().float().mean(0) - 15.5  # centre of mass, pixels from the middle
        along = {0: -rows, 1: rows, 2: -cols, 3: cols}[int(attrs["position"][n])]
        assert along > 1.5 and along > abs(cols if attrs["position"][n] < 2 else rows)
    for shape in range(3):  # (a small circle may cover more pixels than a large triangle)
        of_shape = attrs["shape"] == shape
        assert area[of_shape & (attrs["size"] == 0)].max() < area[of_shape & (attrs["size"] == 1)].min()


def test_train_split_never_shows_held_out_combinations():
    _, _, attrs = C.make_batch(torch.arange(3000), 0, train_split=True)
    combos = set(zip(*(attrs[name].tolist() for name in C.ATTRIBUTES)))
    held = {tuple(row) for row in C._HELD_OUT_IDS.tolist()}
    assert not combos & held and len(combos) == 72 - len(held)
    _, _, all_attrs = C.make_batch(torch.arange(3000), 0)
    assert held <= set(zip(*(all_attrs[name].tolist() for name in C.ATTRIBUTES)))


def test_tokenize():
    tokens = C.tokenize(["a small red circle at the top", "", "A Red Shape"])
    assert tokens.shape == (3, C.MAX_LEN) and tokens.dtype == torch.int64
    assert [C.VOCAB[i] for i in tokens[0, :8]] == ["<start>", "a", "small", "red", "circle", "at", "the", "top"]
    assert tokens[0, 8:].eq(C.PAD_ID).all() and tokens[1, 0] == C.START_ID and tokens[1, 1:].eq(0).all()
    assert C.tokenize([]).shape == (0, C.MAX_LEN)
    with pytest.raises(UserError, match="unknown word 'purple'") as e:
        C.tokenize(["a purple circle"])
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="unknown word '<pad>'"):
        C.tokenize(["a <pad> circle"])
    with pytest.raises(UserError, match="at most 9"):
        C.tokenize(["a " * 10])


# -- blocks ------------------------------------------------------------------------------------------------------


def test_text_encoder_ignores_padding():
    torch.manual_seed(0)
    enc = C.TextEncoder(len(C.VOCAB), D, depth=2, heads=H, max_len=C.MAX_LEN)
    tokens = C.tokenize(["a red circle", "a small blue square on the left"])
    y, mask = enc(tokens)
    assert y.shape == (2, C.MAX_LEN, D) and mask.tolist()[0] == [True] * 4 + [False] * 6
    shorter, _ = enc(tokens[:1, :4])  # the same caption without trailing padding
    assert torch.allclose(shorter[0], y[0, :4], atol=1e-5)


def test_pixart_block_adaln_single_and_masked_cross_attention():
    torch.manual_seed(0)
    block = C.PixArtBlock(D, H)
    # adaLN-single: the block's only conditioning parameters are its [6, D] table (a DiT block: 6D(D+1)).
    assert block.scale_shift_table.shape == (6, D)
    assert not any("adaLN" in name for name, _ in block.named_parameters())
    x, y, t6 = torch.randn(2, 5, D), torch.randn(2, 4, D), torch.randn(2, 6 * D)
    mask = torch.tensor([[True, True, False, False], [True, True, True, False]])
    out = block(x, y, t6, mask)
    assert out.shape == x.shape
    assert torch.equal(block(x, y * 2, t6, mask), out)  # cross-attention starts at zero: text ignored
    torch.nn.init.normal_(block.cross_attn.proj.weight)
    out = block(x, y, t6, mask)
    y2 = y.clone()
    y2[0, 2:] = torch.randn(2, D)  # only padded text tokens change
    y2[1, 3] = 100.0
    assert torch.equal(block(x, y2, t6, mask), out)
    y2[0, 1] = torch.randn(D)  # a real token changes
    assert not torch.allclose(block(x, y2, t6, mask)[0], out[0])
    # the table is added to t6: shifting t6 by a row and the table back by it changes nothing
    delta = torch.randn(6, D)
    with torch.no_grad():
        block.scale_shift_table -= delta
    assert torch.allclose(block(x, y, t6 + delta.flatten(), mask), out, atol=1e-5)


def test_caption_dit_pixart_has_one_t_block():
    model = C.CaptionDiT("pixart", hidden_size=D, depth=3, num_heads=H, patch_size=4)
    t_blocks = [name for name, m in model.named_modules() if name.endswith("t_block")]
    assert t_blocks == ["t_block"] and model.t_block[1].out_features == 6 * D
    per_block = {n for n, _ in model.blocks[0].named_parameters()}
    assert "scale_shift_table" in per_block and not any("adaLN" in n for n in per_block)


def test_mmdit_block_identity_at_init_and_joint_attention():
    torch.manual_seed(0)
    block = C.MMDiTBlock(D, H)
    x, c, vec = torch.randn(2, 5, D), torch.randn(2, 4, D), torch.randn(2, D)
    mask = torch.tensor([[True, True, True, False], [True] * 4])
    x_out, c_out = block(x, c, vec, mask)
    assert torch.equal(x_out, x) and torch.equal(c_out, c)  # adaLN-Zero: every gate is 0
    for stream in (block.x_block, block.context_block):
        torch.nn.init.normal_(stream.adaLN_modulation[-1].weight, std=0.1)
    x_out, c_out = block(x, c, vec, mask)
    c2 = c.clone()
    c2[1, 0] = torch.randn(D)  # a text token changes the image tokens (joint attention) ...
    assert not torch.allclose(block(x, c2, vec, mask)[0][1], x_out[1])
    x2 = x.clone()
    x2[1, 0] = torch.randn(D)  # ... and an image token changes the text tokens
    assert not torch.allclose(block(x2, c, vec, mask)[1][1], c_out[1])
    c3 = c.clone()
    c3[0, 3] = 50.0  # a padded text token changes nothing but itself
    x3, c3_out = block(x, c3, vec, mask)
    assert torch.equal(x3, x_out) and torch.equal(c3_out[:, :3], c_out[:, :3])
    assert torch.equal(c3_out[1], c_out[1])


@pytest.mark.parametrize("arch", C.ARCHS)
def test_caption_dit_shapes_padding_and_cfg(arch):
    torch.manual_seed(0)
    model = C.CaptionDiT(arch, hidden_size=D, depth=2, num_heads=H, patch_size=4).eval()
    for p in model.parameters():  # leave the zero init, so every path matters
        torch.nn.init.normal_(p, std=0.1) if p.requires_grad else None
    x, t = torch.randn(3, 3, 16, 16), torch.tensor([10.0, 500.0, 990.0])
    tokens = C.tokenize(["a small red circle at the top", "a blue square", "a large green triangle"])
    out = model(x, t, tokens)
    assert out.shape == x.shape
    longer = C.CaptionDiT(arch, hidden_size=D, depth=2, num_heads=H, patch_size=4, max_len=16).eval()
    longer.load_state_dict({k: v if v.shape == longer.state_dict()[k].shape else
                            torch.cat([v, longer.state_dict()[k][:, v.shape[1]:]], 1)
                            for k, v in model.state_dict().items()})  # fmt: skip
    assert torch.allclose(longer(x, t, C.tokenize(["a small red circle at the top", "a blue square",
                                                    "a large green triangle"], 16)), out, atol=1e-5)  # fmt: skip
    other = C.tokenize(["a small red circle at the top", "a red square", "a large green triangle"])
    changed = model(x, t, other)
    assert not torch.allclose(changed[1], out[1]) and torch.allclose(changed[[0, 2]], out[[0, 2]], atol=1e-6)
    assert torch.allclose(model.forward_with_cfg(x, t, tokens, 1.0), out, atol=1e-5)
    null = model(x, t, model.null_tokens(3))
    assert torch.allclose(model.forward_with_cfg(x, t, tokens, 0.0), null, atol=1e-5)
    assert torch.allclose(model.forward_with_cfg(x, t, tokens, 3.0), null + 3 * (out - null), atol=1e-4)
    dropped = model(x, t, tokens, force_drop_ids=torch.tensor([0, 1, 0]))
    assert torch.allclose(dropped[1], null[1], atol=1e-6) and torch.allclose(dropped[0], out[0], atol=1e-6)


def test_fresh_pixart_ignores_text_and_fresh_mmdit_outputs_zero():
    for arch in C.ARCHS:
        model = C.CaptionDiT(arch, hidden_size=D, depth=2, num_heads=H, patch_size=4).eval()
        x, t = torch.randn(2, 3, 16, 16), torch.tensor([3.0, 700.0])
        assert model(x, t, C.tokenize(["a red circle", "a blue square"])).abs().max() == 0  # zero output layer


def test_training_resumes_exactly_and_exports(tmp_path, monkeypatch):
    from minidit import captions_train as ct

    monkeypatch.setitem(C.MODEL_CONFIGS, "pixart", dict(image_size=16, patch_size=4, hidden_size=32, depth=1,
                                                         num_heads=4, text_depth=1))  # fmt: skip
    monkeypatch.setattr(ct, "SAVE_EVERY", 3)
    first = ct.train(tmp_path / "run", "pixart", steps=3, batch_size=8, seed=0)
    resumed = ct.train(tmp_path / "run", "pixart", steps=6, batch_size=8, seed=0)
    ct.train(tmp_path / "straight", "pixart", steps=6, batch_size=8, seed=0)
    assert first["step"] == 3 and resumed["step"] == 6
    a = torch.load(tmp_path / "run/checkpoints/last.pt", weights_only=True)
    b = torch.load(tmp_path / "straight/checkpoints/last.pt", weights_only=True)
    assert a["step"] == 6 and all(torch.equal(a["ema"][k], b["ema"][k]) for k in a["ema"])
    out = ct.export(tmp_path / "run", tmp_path / "m.safetensors")
    model, cfg = C.load_caption_dit("pixart", out)
    assert cfg["trained_steps"] == 6 and cfg["depth"] == 1
    assert C.generate(model, ["a red circle"], steps=2).shape == (1, 3, 16, 16)
    with pytest.raises(UserError, match="holds a 'pixart' model, not 'mmdit'"):
        C.load_caption_dit("mmdit", out)
    with pytest.raises(UserError, match="different run"):
        ct.train(tmp_path / "run", "pixart", steps=8, batch_size=4)
    with pytest.raises(UserError, match="already finished 6 steps"):
        ct.train(tmp_path / "run", "pixart", steps=6, batch_size=8)
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match="cannot write the run directory .*file .*not a directory"):
        ct.train(tmp_path / "file", "pixart", steps=1, batch_size=8)
    from minidit.rundir import lock, unlock

    fd = lock(tmp_path / "busy")  # another trainer holds it
    try:
        with pytest.raises(UserError, match="in use by another training process"):
            ct.train(tmp_path / "busy", "pixart", steps=1, batch_size=8)
    finally:
        unlock(fd)
    (tmp_path / "foreign" / "checkpoints").mkdir(parents=True)
    torch.save({"w": torch.zeros(1)}, tmp_path / "foreign" / "checkpoints" / "last.pt")
    with pytest.raises(UserError, match="not a caption DiT checkpoint; it is left in place"):
        ct.train(tmp_path / "foreign", "pixart", steps=1, batch_size=8)
    assert (tmp_path / "foreign" / "checkpoints" / "last.pt").exists()


def test_missing_files_name_the_command(tmp_path, capsys):
    with pytest.raises(UserError, match="minidit.captions train --arch mmdit"):
        C.load_caption_dit("mmdit", tmp_path / "none.safetensors")
    with pytest.raises(UserError, match="train-classifier"):
        C.load_caption_classifier(tmp_path / "none.safetensors")
    assert run_cli(C.main, ["preview", "--arch", "pixart", "--caption", "a purple circle"]) == 2
    assert "unknown word 'purple'" in capsys.readouterr().err
    assert run_cli(C.main, ["preview", "--caption", "a red circle", "--out", str(tmp_path / "p.png")]) == 2
    assert "--caption needs --arch" in capsys.readouterr().err and not (tmp_path / "p.png").exists()


# -- the shipped files -------------------------------------------------------------------------------------------


def test_shipped_classifier_knows_every_attribute():
    classifier = C.load_caption_classifier()
    images, _, attrs = C.make_batch(torch.arange(400), 7)
    accuracy = C.score(images, attrs, classifier)
    assert all(accuracy[name] >= 0.98 for name in C.ATTRIBUTES), accuracy


@pytest.mark.parametrize("arch", C.ARCHS)
def test_shipped_caption_dit_draws_what_is_asked(arch):
    model, cfg = C.load_caption_dit(arch)
    assert cfg["arch"] == arch and model.arch == arch
    captions = C.make_batch(torch.arange(10), 3)  # 10 captions of data seed 3
    images = C.generate(model, captions[1], cfg_scale=4.0, steps=20, seed=0)
    accuracy = C.score(images, captions[2])
    assert all(accuracy[name] >= 0.8 for name in C.ATTRIBUTES), accuracy


def test_make_batch_takes_toys_argument_order_and_refuses_float_indices():
    """(indices, seed) as minidit.toy.make_batch and video.make_batch; 2.7 is not silently read as image 2."""
    images, _, _ = C.make_batch(torch.arange(3), seed=0)
    assert torch.equal(images, C.make_batch([0, 1, 2])[0])
    with pytest.raises(ValueError, match="1-D integer"):
        C.make_batch(torch.tensor([2.7]))


def test_preview_takes_every_caption_given(tmp_path, capsys):
    """`--caption A --caption B` and `--caption A B` both sample A and B (a repeated flag used to keep only B)."""
    out = tmp_path / "p.png"
    args = ["preview", "--arch", "pixart", "--out", str(out), "--caption", "a red circle at the top"]
    assert run_cli(C.main, args + ["--caption", "a large blue square on the left"]) == 0
    assert "0: a red circle at the top; 1: a large blue square on the left" in capsys.readouterr().out and out.exists()


def test_export_refuses_a_run_of_another_trainer(tmp_path):
    """A minidit.train (class-conditional DiT) run holds a config and EMA weights too: exporting it as a caption
    DiT used to write a file that no loader could read."""
    (tmp_path / "checkpoints").mkdir()
    torch.save({"config": {"model": "DiT-Ti/4"}, "ema": {"w": torch.zeros(1)}, "step": 3},
               tmp_path / "checkpoints" / "last.pt")  # fmt: skip
    from minidit import captions_train as ct

    with pytest.raises(UserError, match="not a caption DiT run directory .*another trainer"):
        ct.export(tmp_path, tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize("command", [["eval", "--arch", "pixart"], ["preview", "--arch", "pixart"]])
@pytest.mark.parametrize("scale", ["-2", "nan", "inf", "lots"])
def test_a_guidance_scale_that_is_not_finite_and_non_negative_is_one_line(command, scale, capsys):
    """-2 used to run: guidance away from the caption, scored as if it were a result."""
    assert run_cli(C.main, command + ["--cfg-scale", scale]) == 2
    err = capsys.readouterr().err
    assert "argument --cfg-scale:" in err and "Traceback" not in err
