"""Tests of minidit.checkpoint: safe reading, round trips, layouts, diffusers interop, downloads.

Every model compared here has its zero-initialised weights (adaLN regressors, output layer)
perturbed first: a fresh DiT outputs exactly 0, so comparing fresh models would prove nothing.
Everything runs on the CPU; the only network used is a local HTTP server on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import http.server
import json
import pickle
import random
import re
import shutil
import threading
import zipfile
from pathlib import Path

import pytest
import torch

import minidit
from minidit import DiT, DiT_models, fileio
from minidit import checkpoint as ck
from minidit.checkpoint import CheckpointError, Pretrained

# torch warns about pickle protocols when it reads a plain pickle.dump file (which it then refuses).
pytestmark = pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")

SMALL = dict(input_size=8, patch_size=2, hidden_size=64, depth=2, num_heads=4, num_classes=10)


def small_dit(**overrides) -> DiT:
    return DiT(**{**SMALL, **overrides})


def perturb(model: torch.nn.Module, seed: int, scale: float = 0.05) -> torch.nn.Module:
    """Add noise to every trainable weight (the fixed pos_embed table is left as it is)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)
    return model.eval()


def inputs(in_channels: int = 4, size: int = 8):
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(3, in_channels, size, size, generator=g)
    t = torch.tensor([1, 500, 999])
    y = torch.tensor([0, 3, 10])  # 10: the null label of a 10-class model
    return x, t, y


def run(model: DiT) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(*inputs(model.in_channels, model.input_size))


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def trained():
    """A small perturbed DiT and its output on fixed inputs (clearly nonzero)."""
    model = perturb(small_dit(), seed=0)
    out = run(model)
    assert out.abs().max() > 0.1
    return model, out


# --------------------------------------------------------------------------
# 1. Round trips
# --------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_bare_state_dict_round_trip(tmp_path, trained, suffix):
    model, out = trained
    path = tmp_path / f"weights{suffix}"
    ck.save_checkpoint(model.state_dict(), path)
    if suffix == ".pt":
        assert zipfile.is_zipfile(path)  # torch.save's zip format
    else:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            assert sorted(f.keys()) == sorted(model.state_dict())

    assert_same_state(ck.read_file(path), model.state_dict())
    assert_same_state(ck.load_state_dict(path), model.state_dict())

    fresh = small_dit().eval()
    assert not torch.equal(run(fresh), out)  # so that the next assertion means something
    assert ck.load_checkpoint(fresh, path) is fresh
    assert torch.equal(run(fresh), out)

    rebuilt = ck.model_from_checkpoint(path, num_heads=4)
    assert not rebuilt.training
    assert (rebuilt.hidden_size, len(rebuilt.blocks), rebuilt.num_classes, rebuilt.input_size) == (64, 2, 10, 8)
    assert torch.equal(run(rebuilt), out)

    # 64 wide and 2 deep is no zoo size: the head count is not in the shapes.
    with pytest.raises(CheckpointError, match="num_heads"):
        ck.model_from_checkpoint(path)


def test_reference_torch_save_file_and_zoo_inference(tmp_path):
    """A zoo-size model saved with plain torch.save (as the reference does) rebuilds without hints."""
    model = perturb(DiT_models["DiT-S/2"](input_size=8, num_classes=10), seed=3)
    out = run(model)
    path = tmp_path / "DiT-S-2.pt"
    torch.save(model.state_dict(), path)

    with pytest.warns(ck.CheckpointWarning, match="assuming 10 classes plus a null class"):
        config = ck.infer_config(ck.load_state_dict(path))
    assert config == dict(
        input_size=8, patch_size=2, in_channels=4, hidden_size=384, depth=12, mlp_ratio=4.0,
        num_classes=10, class_dropout_prob=0.1, learn_sigma=True, num_heads=6,
    )  # fmt: skip
    assert ck.model_name(config) == "DiT-S/2"
    with pytest.warns(ck.CheckpointWarning):
        rebuilt = ck.model_from_checkpoint(path)
    assert rebuilt.num_heads == 6
    assert torch.equal(run(rebuilt), out)


def test_training_checkpoint_prefers_ema(tmp_path):
    model = small_dit()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0)
    perturb(model, seed=0)
    model.train()
    loss = model(*inputs()).square().mean()
    loss.backward()
    opt.step()
    ema = perturb(copy.deepcopy(model), seed=1)  # differs from model
    out_model, out_ema = run(model), run(ema)
    assert (out_model - out_ema).abs().max() > 1e-2

    # The reference train.py saves exactly this, args being its argparse.Namespace.
    args = argparse.Namespace(model="DiT-S/2", image_size=64, num_classes=10, global_seed=0, vae="ema")
    checkpoint = {"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(), "args": args}
    path = tmp_path / "0400000.pt"
    torch.save(checkpoint, path)

    raw = ck.read_file(path)
    assert raw["args"].image_size == 64
    assert raw["opt"]["param_groups"][0]["lr"] == 1e-4
    assert_same_state(ck.load_state_dict(path), ema.state_dict())
    assert_same_state(ck.load_state_dict(path, prefer_ema=False), model.state_dict())

    assert torch.equal(run(ck.load_checkpoint(small_dit(), path)), out_ema)
    assert torch.equal(run(ck.load_checkpoint(small_dit(), path, prefer_ema=False)), out_model)
    assert torch.equal(run(ck.model_from_checkpoint(path, num_heads=4)), out_ema)
    assert torch.equal(run(ck.model_from_checkpoint(path, prefer_ema=False, num_heads=4)), out_model)

    # A minidit-style checkpoint (plus step and RNG state) without "ema" falls back to "model".
    path2 = tmp_path / "no-ema.pt"
    ck.save_checkpoint({"model": model.state_dict(), "step": 7, "rng": torch.get_rng_state()}, path2)
    assert torch.equal(run(ck.load_checkpoint(small_dit(), path2)), out_model)


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod.", "_orig_mod.module."])
@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_wrapper_prefixes_are_stripped(tmp_path, trained, prefix, suffix):
    model, out = trained
    wrapped = {prefix + k: v for k, v in model.state_dict().items()}
    path = tmp_path / f"wrapped{suffix}"
    ck.save_checkpoint(wrapped, path)
    assert all(k.startswith(prefix) for k in ck.read_file(path))
    assert_same_state(ck.load_state_dict(path), model.state_dict())
    assert torch.equal(run(ck.load_checkpoint(small_dit(), path)), out)
    assert torch.equal(run(ck.model_from_checkpoint(path, num_heads=4)), out)


# --------------------------------------------------------------------------
# 2. Refusals: code-running pickles, broken files
# --------------------------------------------------------------------------


class Evil:
    """Unpickling this runs Python code that plants a marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def _evil_file(path: Path, marker: Path, how: str) -> None:
    obj = {"w": Evil(marker), "b": torch.zeros(2)}
    if how == "torch.save":
        torch.save(obj, path)
    elif how == "torch.save-legacy":
        torch.save(obj, path, _use_new_zipfile_serialization=False)
    else:
        protocol = {"pickle": pickle.DEFAULT_PROTOCOL, "pickle-2": 2, "pickle-0": 0}[how]
        with open(path, "wb") as f:
            pickle.dump({"w": Evil(marker)}, f, protocol=protocol)


@pytest.mark.parametrize("how", ["torch.save", "torch.save-legacy", "pickle", "pickle-2", "pickle-0"])
def test_code_running_pickle_is_refused(tmp_path, how):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pt"
    _evil_file(path, marker, how)

    for load in (ck.read_file, ck.load_state_dict, lambda p: ck.load_checkpoint(small_dit(), p)):
        with pytest.raises(CheckpointError) as e:
            load(path)
        msg = str(e.value)
        assert "refused" in msg and "arbitrary Python code" in msg, msg
        assert "exec" in msg, msg  # names what it would have called
        assert "\n" not in msg
    with pytest.raises(CheckpointError, match="refused"):
        ck.model_from_checkpoint(path)
    assert not marker.exists()

    # The payload is live: an unsafe load does run it (so the check above could fail).
    if how.startswith("torch.save"):
        torch.load(path, weights_only=False)
    else:
        with open(path, "rb") as f:
            pickle.load(f)
    assert marker.read_text() == "pwned"


def _noise(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def _valid_bytes(tmp_path: Path, suffix: str) -> bytes:
    src = tmp_path / f"valid{suffix}"
    ck.save_checkpoint(perturb(small_dit(), seed=0).state_dict(), src)
    return src.read_bytes()


@pytest.mark.parametrize(
    "suffix, make",
    [
        (".pt", lambda b: b[: len(b) // 2]),
        (".pt", lambda b: b[:100]),
        (".pt", lambda b: b""),
        (".pt", lambda b: _noise(4096, seed=20)),  # KeyError inside torch
        (".pt", lambda b: b"\x80\x02" + _noise(4096, seed=2)),  # like a pickle; IndexError inside torch
        (".bin", lambda b: b[: len(b) // 2]),
        (".safetensors", lambda b: b[: len(b) // 2]),
        (".safetensors", lambda b: b[:10]),
        (".safetensors", lambda b: b""),
        (".safetensors", lambda b: _noise(4096, seed=2)),
    ],
    ids=["pt-half", "pt-100B", "pt-empty", "pt-random", "pt-pickle-random", "bin-half", "st-half", "st-10B",
         "st-empty", "st-random"],
)  # fmt: skip
def test_broken_file_is_a_one_line_error(tmp_path, suffix, make):
    good = _valid_bytes(tmp_path, ".safetensors" if suffix == ".safetensors" else ".pt")
    path = tmp_path / f"broken{suffix}"
    path.write_bytes(make(good))
    with pytest.raises(CheckpointError) as e:
        ck.load_state_dict(path)
    msg = str(e.value)
    assert "\n" not in msg
    assert "truncated" in msg or "corrupt" in msg, msg
    assert str(path) in msg
    assert "refused" not in msg  # nothing in these files would run code


def test_damaged_files_never_escape_as_other_errors(tmp_path):
    """Seeded fuzz: truncations, byte flips and noise make torch's safe unpickler raise IndexError,
    KeyError, AssertionError, TypeError...; every one must come out as a one-line CheckpointError
    (or, for a flip inside tensor data, as a loaded dict)."""
    rng = random.Random(0)
    zipped = _valid_bytes(tmp_path, ".pt")
    legacy_path = tmp_path / "legacy.pt"
    torch.save(small_dit().state_dict(), legacy_path, _use_new_zipfile_serialization=False)
    legacy = legacy_path.read_bytes()
    st = _valid_bytes(tmp_path, ".safetensors")
    errors = 0
    for i in range(240):
        suffix, kind = ".pt", i % 6
        if kind == 0:
            data = _noise(rng.randrange(1, 300), seed=i)
        elif kind == 1:
            data = b"\x80\x02" + _noise(rng.randrange(1, 300), seed=i)
        elif kind in (2, 3):
            src = zipped if kind == 2 else legacy
            data = src[: rng.randrange(len(src))]
        elif kind == 4:
            flipped = bytearray(rng.choice([zipped, legacy]))
            for _ in range(rng.randrange(1, 5)):
                flipped[rng.randrange(min(len(flipped), 2000))] = rng.randrange(256)
            data = bytes(flipped)
        else:
            suffix, data = ".safetensors", st[: rng.randrange(len(st))]
        path = tmp_path / f"fuzz{i}{suffix}"
        path.write_bytes(data)
        try:
            assert isinstance(ck.read_file(path), dict)
        except CheckpointError as e:
            errors += 1
            assert "\n" not in str(e), str(e)
    assert errors > 200  # nearly all are rejected


def test_not_a_state_dict(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        ck.load_state_dict(tmp_path / "missing.pt")
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    with pytest.raises(CheckpointError, match="expected a dict of tensors, found Tensor"):
        ck.load_state_dict(tmp_path / "tensor.pt")
    torch.save({"w": torch.zeros(3), "step": 5}, tmp_path / "mixed.pt")
    with pytest.raises(CheckpointError, match=r"not a state dict: entries \['step'\]"):
        ck.load_state_dict(tmp_path / "mixed.pt")
    ck.save_checkpoint({"w": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a DiT state dict"):
        ck.model_from_checkpoint(tmp_path / "other.pt", num_heads=4)


# --------------------------------------------------------------------------
# 3. Architecture mismatches
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "saved, target, expected",
    [
        (dict(hidden_size=32), {}, ["x_embedder.proj.weight (32, 4, 2, 2) vs (64, 4, 2, 2)", "shape mismatch"]),
        ({}, dict(hidden_size=32), ["pos_embed (1, 16, 64) vs (1, 16, 32)"]),
        (dict(depth=3), {}, ["unexpected: blocks.2.attn.qkv.weight"]),
        ({}, dict(depth=3), ["missing: blocks.2.attn.qkv.weight"]),
        (dict(num_classes=1000), {}, ["y_embedder.embedding_table.weight (1001, 64) vs (11, 64)"]),
        (dict(input_size=16), {}, ["pos_embed (1, 64, 64) vs (1, 16, 64)"]),
        (dict(learn_sigma=False), {}, ["final_layer.linear.weight (16, 64) vs (32, 64)"]),
    ],
)
def test_other_architecture_is_refused(tmp_path, saved, target, expected):
    path = tmp_path / "other.pt"
    ck.save_checkpoint(perturb(small_dit(**saved), seed=5).state_dict(), path)
    model = small_dit(**target)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(CheckpointError) as e:
        ck.load_checkpoint(model, path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: does not fit this model: ")
    assert "\n" not in msg
    for part in expected:
        assert part in msg, msg
    assert_same_state(model.state_dict(), before)  # untouched


def test_mismatch_lists_are_capped(tmp_path):
    path = tmp_path / "deep.pt"
    ck.save_checkpoint(small_dit(depth=4).state_dict(), path)
    with pytest.raises(CheckpointError) as e:
        ck.load_checkpoint(small_dit(), path)
    # two extra blocks of 10 tensors each: 4 named, 16 counted
    assert "unexpected: blocks.2." in str(e.value) and "(+16 more)" in str(e.value)


# --------------------------------------------------------------------------
# 4. The released DiT-XL/2 layout
# --------------------------------------------------------------------------


def synthetic(shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """A state dict of the given shapes, tensor i holding the constant i + 1 everywhere, each a
    stride-0 view of one value: torch.save keeps the view, so its file is tiny whatever the shapes."""
    return {k: torch.tensor(float(i + 1)).expand(s) for i, (k, s) in enumerate(shapes.items())}


def assert_synthetic(sd: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]]) -> None:
    assert {k: tuple(v.shape) for k, v in sd.items()} == shapes
    for i, k in enumerate(shapes):
        lo, hi = torch.aminmax(sd[k])
        assert lo.item() == hi.item() == float(i + 1), k


def zoo_shapes(name: str, **kwargs) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in DiT_models[name](**kwargs).state_dict().items()}


def xl2_table() -> dict[str, tuple[int, ...]]:
    """DiT-XL/2 (256x256: 32x32 latents) state-dict shapes, written out from the published release."""
    D, N = 1152, 28
    table = {
        "pos_embed": (1, 256, D),
        "x_embedder.proj.weight": (D, 4, 2, 2),
        "x_embedder.proj.bias": (D,),
        "t_embedder.mlp.0.weight": (D, 256),
        "t_embedder.mlp.0.bias": (D,),
        "t_embedder.mlp.2.weight": (D, D),
        "t_embedder.mlp.2.bias": (D,),
        "y_embedder.embedding_table.weight": (1001, D),
    }
    for n in range(N):
        b = f"blocks.{n}."
        table.update(
            {
                b + "attn.qkv.weight": (3456, D),
                b + "attn.qkv.bias": (3456,),
                b + "attn.proj.weight": (D, D),
                b + "attn.proj.bias": (D,),
                b + "mlp.fc1.weight": (4608, D),
                b + "mlp.fc1.bias": (4608,),
                b + "mlp.fc2.weight": (D, 4608),
                b + "mlp.fc2.bias": (D,),
                b + "adaLN_modulation.1.weight": (6912, D),
                b + "adaLN_modulation.1.bias": (6912,),
            }
        )
    table.update(
        {
            "final_layer.linear.weight": (32, D),
            "final_layer.linear.bias": (32,),
            "final_layer.adaLN_modulation.1.weight": (2304, D),
            "final_layer.adaLN_modulation.1.bias": (2304,),
        }
    )
    return table


def test_xl2_keys_and_shapes():
    with torch.device("meta"):
        model = DiT_models["DiT-XL/2"]()
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    table = xl2_table()
    assert len(table) == 8 + 28 * 10 + 4
    assert sorted(set(shapes) - set(table)) == []
    assert sorted(set(table) - set(shapes)) == []
    assert shapes == table
    assert sum(p.numel() for p in model.parameters()) == 675_129_632
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 674_834_720
    assert sum(torch.Size(s).numel() for s in table.values()) == 675_129_632


def test_xl2_strict_load_of_reference_layout(tmp_path):
    """A synthetic file in the released layout loads strictly into DiT-XL/2, each tensor in its place.

    Each tensor is one distinct constant, stored as a stride-0 view of a single value: torch.save
    keeps the view, so the file is ~80 kB instead of 2.7 GB while the shapes are the real ones.
    """
    table = xl2_table()
    path = tmp_path / "DiT-XL-2-256x256.pt"
    torch.save(synthetic(table), path)
    assert path.stat().st_size < 1_000_000

    with torch.device("meta"):
        model = DiT_models["DiT-XL/2"]()
    model = model.to_empty(device="cpu")  # the real model, without paying for its random init
    assert ck.load_checkpoint(model, path) is model
    assert_synthetic(model.state_dict(), table)

    # The released 512x512 checkpoint (64x64 latents) has a 1024-token pos_embed: it does not fit.
    with pytest.raises(CheckpointError, match=r"pos_embed \(1, 256, 1152\) vs \(1, 1024, 1152\)"):
        with torch.device("meta"):
            ck.load_checkpoint(DiT_models["DiT-XL/2"](input_size=64), path)


# --------------------------------------------------------------------------
# 5. diffusers interop
# --------------------------------------------------------------------------


def _patch_freqs(dm) -> None:
    """diffusers divides the timestep frequencies by half_dim - 1 = 127; the reference by 128."""
    for block in dm.transformer_blocks:
        block.norm1.emb.time_proj.downscale_freq_shift = 0


def _diffusers_out(dm, in_channels: int = 4, size: int = 8) -> torch.Tensor:
    x, t, y = inputs(in_channels, size)
    with torch.no_grad():
        return dm.eval()(x, timestep=t, class_labels=y).sample


@pytest.fixture(scope="module")
def exported(tmp_path_factory, trained):
    pytest.importorskip("diffusers")
    model, out = trained
    out_dir = ck.export_diffusers(model, tmp_path_factory.mktemp("export") / "dit")
    return model, out, out_dir


def test_export_diffusers_loads_cleanly(exported):
    diffusers = pytest.importorskip("diffusers")
    model, out, out_dir = exported
    assert sorted(p.name for p in out_dir.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    config = json.loads((out_dir / "config.json").read_text())
    assert config["norm_eps"] == 1e-6 and config["num_layers"] == 2 and config["sample_size"] == 8

    dm, info = diffusers.DiTTransformer2DModel.from_pretrained(out_dir, output_loading_info=True)
    assert info["missing_keys"] == [] and info["unexpected_keys"] == [] and info["mismatched_keys"] == []
    assert info["error_msgs"] == []

    unpatched = _diffusers_out(dm)
    diff = (unpatched - out).abs().max().item()
    # The /127 vs /128 timestep frequencies are a real difference: measured max abs 0.085,
    # relative (Frobenius norm) 0.041 for this model.
    assert diff > 1e-4
    assert ((unpatched - out).norm() / out.norm()).item() < 0.2

    _patch_freqs(dm)
    torch.testing.assert_close(_diffusers_out(dm), out, atol=1e-5, rtol=0)  # measured: exactly equal


def test_diffusers_layout_reloads_bit_exactly(exported, tmp_path):
    model, out, out_dir = exported
    assert_same_state(ck.load_state_dict(out_dir), model.state_dict())
    assert torch.equal(run(ck.load_checkpoint(small_dit(), out_dir)), out)
    assert torch.equal(run(ck.model_from_checkpoint(out_dir, num_heads=4)), out)

    pipeline = tmp_path / "pipeline"
    shutil.copytree(out_dir, pipeline / "transformer")
    (pipeline / "model_index.json").write_text(json.dumps({"_class_name": "DiTPipeline"}))
    assert_same_state(ck.load_state_dict(pipeline), model.state_dict())
    assert torch.equal(run(ck.model_from_checkpoint(pipeline, num_heads=4)), out)

    file = out_dir / "diffusion_pytorch_model.safetensors"
    assert ck.is_diffusers_layout(ck.read_file(file))
    assert_same_state(ck.load_state_dict(file, input_size=8), model.state_dict())
    assert torch.equal(run(ck.load_checkpoint(small_dit(), file)), out)  # input_size from the model
    assert torch.equal(run(ck.model_from_checkpoint(file, input_size=8, num_heads=4)), out)
    with pytest.raises(CheckpointError, match="input_size"):
        ck.load_state_dict(file)


def test_diffusers_dir_without_weights(tmp_path, exported):
    _, _, out_dir = exported
    (tmp_path / "config.json").write_bytes((out_dir / "config.json").read_bytes())
    with pytest.raises(CheckpointError, match="diffusion_pytorch_model.safetensors"):
        ck.load_state_dict(tmp_path)


def _native_diffusers(**kw):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    dm = diffusers.DiTTransformer2DModel(
        num_attention_heads=4, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2,
        sample_size=8, patch_size=2, num_embeds_ada_norm=10, **kw,
    )  # fmt: skip
    perturb(dm, seed=7)
    # diffusers keeps a copy of the timestep MLP and label table in every block; the reference
    # (and a diffusers model converted from it) has one: make the copies equal again.
    shared = dm.transformer_blocks[0].norm1.emb.state_dict()
    for block in dm.transformer_blocks[1:]:
        block.norm1.emb.load_state_dict(shared)
    return dm.eval()


@pytest.mark.parametrize(
    "norm_eps, atol",
    [
        (1e-6, 1e-5),  # the reference's eps: measured exactly equal
        (None, 1e-4),  # diffusers' default 1e-5 in the LayerNorm before the MLP: measured 1.04e-5
    ],
)
def test_native_diffusers_model_loads(tmp_path, norm_eps, atol):
    dm = _native_diffusers(**({} if norm_eps is None else {"norm_eps": norm_eps}))
    dm.save_pretrained(tmp_path / "native")
    model = ck.model_from_checkpoint(tmp_path / "native", num_heads=4)
    assert (model.hidden_size, model.num_heads, len(model.blocks), model.num_classes) == (64, 4, 2, 10)
    out = run(model)
    assert out.abs().max() > 0.1

    assert (_diffusers_out(dm) - out).abs().max() > 1e-4  # the frequency difference again
    _patch_freqs(dm)
    patched = _diffusers_out(dm)
    torch.testing.assert_close(patched, out, atol=atol, rtol=0)
    if norm_eps is None:
        assert (patched - out).abs().max() > 1e-7  # the eps difference is real, and small

    # and back: minidit's export of it is the same diffusers state dict
    out_dir = ck.export_diffusers(model, tmp_path / "again")
    assert_same_state(ck.read_file(out_dir / "diffusion_pytorch_model.safetensors"), dm.state_dict())


def test_diverged_per_block_embedders_are_refused(tmp_path):
    """A diffusers model whose per-block timestep/label copies differ (e.g. fine-tuned in diffusers)
    has no reference-layout equivalent: converting it must fail, not silently use block 0's."""
    dm = _native_diffusers(norm_eps=1e-6)
    with torch.no_grad():
        dm.transformer_blocks[1].norm1.emb.class_embedder.embedding_table.weight[3] += 0.01
    dm.save_pretrained(tmp_path / "diverged")
    with pytest.raises(CheckpointError, match=r"transformer_blocks\.1\.norm1\.emb\.class_embedder"):
        ck.load_state_dict(tmp_path / "diverged")


# --------------------------------------------------------------------------
# 6. Downloads from a local server
# --------------------------------------------------------------------------


class _Server:
    """Serves ``routes[path] = (status, body, content_length)`` on 127.0.0.1 and counts requests."""

    def __init__(self):
        self.routes: dict[str, tuple[int, bytes, int | None]] = {}
        self.hits: dict[str, int] = {}
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                server.hits[self.path] = server.hits.get(self.path, 0) + 1
                status, body, length = server.routes.get(self.path, (404, b"not found", None))
                self.send_response(status)
                self.send_header("Content-Length", str(len(body) if length is None else length))
                self.end_headers()
                self.wfile.write(body)
                self.wfile.flush()
                self.close_connection = True  # a short body then ends in a closed connection

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def serve(self, path: str, body: bytes, status: int = 200, length: int | None = None) -> str:
        self.routes[path] = (status, body, length)
        return self.url + path

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)


@pytest.fixture
def server(request):
    s = _Server()
    request.addfinalizer(s.stop)
    return s


@pytest.fixture(scope="module")
def small_file(tmp_path_factory, trained):
    model, out = trained
    path = tmp_path_factory.mktemp("src") / "small.pt"
    ck.save_checkpoint(model.state_dict(), path)
    return path.read_bytes()


def test_download_once_with_progress(server, small_file, tmp_path, trained, capsys):
    model, out = trained
    url = server.serve("/models/small.pt", small_file)
    root = tmp_path / "models"
    path = ck.download("small.pt", root=root, url=url, progress=True)
    assert path == root / "small.pt"
    assert path.read_bytes() == small_file
    assert sorted(p.name for p in root.iterdir()) == ["small.pt"]
    assert "small.pt" in capsys.readouterr().err  # the progress bar
    assert server.hits == {"/models/small.pt": 1}

    again = ck.download("small.pt", root=root, url=url, progress=False)
    assert again == path
    assert server.hits == {"/models/small.pt": 1}  # not fetched twice
    assert torch.equal(run(ck.load_checkpoint(small_dit(), path)), out)


def test_download_checks_sha256(server, small_file, tmp_path):
    url = server.serve("/small.pt", small_file)
    root = tmp_path / "models"
    good = hashlib.sha256(small_file).hexdigest()
    bad = hashlib.sha256(b"something else").hexdigest()
    with pytest.raises(CheckpointError) as e:
        ck.download("small.pt", root=root, url=url, sha256=bad, progress=False)
    assert "corrupt" in str(e.value) and bad in str(e.value) and good in str(e.value)
    assert list(root.iterdir()) == []  # neither the file nor a temporary one

    path = ck.download("small.pt", root=root, url=url, sha256=good.upper(), progress=False)
    assert path.read_bytes() == small_file
    assert server.hits["/small.pt"] == 2


def test_download_truncated_transfer(server, small_file, tmp_path):
    url = server.serve("/small.pt", small_file[: len(small_file) // 2], length=len(small_file))
    root = tmp_path / "models"
    with pytest.raises(CheckpointError) as e:
        ck.download("small.pt", root=root, url=url, progress=False)
    msg = str(e.value)
    assert "truncated" in msg or "broke off" in msg, msg
    assert str(len(small_file) // 2) in msg
    assert "\n" not in msg
    assert list(root.iterdir()) == []
    assert server.hits["/small.pt"] == 1


def test_download_http_error(server, tmp_path):
    root = tmp_path / "models"
    with pytest.raises(CheckpointError) as e:
        ck.download("small.pt", root=root, url=server.url + "/nothing-here.pt", progress=False)
    msg = str(e.value)
    assert "\n" not in msg
    assert "Not Found" in msg and "/nothing-here.pt" in msg, msg
    assert list(root.iterdir()) == []
    assert server.hits == {"/nothing-here.pt": 1}


def test_download_unreachable_says_how_to_place_the_file(tmp_path):
    root = tmp_path / "models"
    with pytest.raises(CheckpointError) as e:
        ck.download("small.pt", root=root, url="http://127.0.0.1:1/small.pt", progress=False, timeout=5)
    msg = str(e.value)
    assert "\n" not in msg
    assert "cannot download small.pt" in msg
    assert f"copy the file to {root / 'small.pt'} by hand" in msg, msg
    assert list(root.iterdir()) == []


def test_download_unknown_name_without_url(tmp_path):
    with pytest.raises(CheckpointError, match="unknown checkpoint 'nope.pt'.*DiT-XL-2-256x256.pt"):
        ck.download("nope.pt", root=tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == []


NAME = "DiT-XL-2-256x256.pt"


def test_download_registered_name_is_load_checked(server, tmp_path, monkeypatch, small_file):
    """A released name is checked by a strict load (no published hash): a wrong file never lands."""
    shapes = zoo_shapes("DiT-S/2", input_size=8)  # 1000 classes, as a released model
    good = tmp_path / "good.pt"
    torch.save(synthetic(shapes), good)
    url = server.serve("/dit.pt", small_file)  # first: a small model, not the registered DiT-S/2
    monkeypatch.setitem(ck.PRETRAINED, NAME, Pretrained(url=url, model="DiT-S/2", input_size=8))
    root = tmp_path / "models"

    with pytest.raises(CheckpointError) as e:
        ck.download(NAME, root=root, progress=False)
    msg = str(e.value)
    assert msg.startswith(f"download of {NAME} is not the expected DiT-S/2: ")
    assert "x_embedder.proj.weight (64, 4, 2, 2) vs (384, 4, 2, 2)" in msg, msg
    assert "\n" not in msg
    assert list(root.iterdir()) == []

    server.serve("/dit.pt", good.read_bytes())  # now the right one
    path = ck.download(NAME, root=root, progress=False)
    assert path == root / NAME and path.read_bytes() == good.read_bytes()
    assert server.hits["/dit.pt"] == 2

    # By name, through load_checkpoint: found in $MINIDIT_HOME, not fetched again.
    monkeypatch.setenv("MINIDIT_HOME", str(root))
    monkeypatch.chdir(tmp_path)
    with torch.device("meta"):
        model = DiT_models["DiT-S/2"](input_size=8)
    model = ck.load_checkpoint(model.to_empty(device="cpu"), NAME)
    assert_synthetic(model.state_dict(), shapes)
    assert server.hits["/dit.pt"] == 2


def test_load_by_name_downloads_on_first_use(server, tmp_path, monkeypatch):
    shapes = zoo_shapes("DiT-S/2", input_size=8)
    src = tmp_path / "src.pt"
    torch.save(synthetic(shapes), src)
    url = server.serve("/dit.pt", src.read_bytes())
    monkeypatch.setitem(ck.PRETRAINED, NAME, Pretrained(url=url, model="DiT-S/2", input_size=8))
    monkeypatch.setenv("MINIDIT_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    assert_synthetic(minidit.find_model(NAME), shapes)  # find_model: the reference's name for load_state_dict
    assert (tmp_path / "home" / NAME).read_bytes() == src.read_bytes()
    assert server.hits == {"/dit.pt": 1}
    assert_synthetic(minidit.find_model(NAME), shapes)
    assert server.hits == {"/dit.pt": 1}


# --------------------------------------------------------------------------
# 7. Atomic writes
# --------------------------------------------------------------------------


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_atomic_write_keeps_old_file_on_failure(tmp_path, error):
    path = tmp_path / "file.bin"
    path.write_bytes(b"old content")

    def write_half_then_fail(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(b"new, partial")
        raise error("crash while writing")

    with pytest.raises(error):
        fileio.atomic_write(path, write_half_then_fail)
    assert path.read_bytes() == b"old content"
    assert [p.name for p in tmp_path.iterdir()] == ["file.bin"]

    fileio.atomic_write(path, lambda tmp: Path(tmp).write_bytes(b"new content"))
    assert path.read_bytes() == b"new content"
    assert [p.name for p in tmp_path.iterdir()] == ["file.bin"]


def test_save_checkpoint_failure_keeps_previous_checkpoint(tmp_path, trained):
    model, out = trained
    path = tmp_path / "ckpt.pt"
    ck.save_checkpoint(model.state_dict(), path)
    before = path.read_bytes()
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
        ck.save_checkpoint({**model.state_dict(), "fn": lambda: 0}, path)  # fails mid-pickle
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]
    assert torch.equal(run(ck.load_checkpoint(small_dit(), path)), out)


# --------------------------------------------------------------------------
# A run's own checkpoint: its config, not guesses from shapes
# --------------------------------------------------------------------------


def minidit_run(tmp_path: Path, dit: DiT, **config) -> Path:
    """A minidit run directory as the trainer leaves it: config.json and checkpoints/last.pt (EMA = model)."""
    config = {"model": "DiT-Ti/2", "class_dropout_prob": 0.1, "learn_sigma": True, "noise_schedule": "linear",
              "diffusion_steps": 1000, "num_classes": None, **config}  # fmt: skip
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps({"config": config, "preset": "toy"}))
    state = {"version": 1, "model": dit.state_dict(), "ema": dit.state_dict(), "step": 3, "config": config}
    ck.save_checkpoint(state, run_dir / "checkpoints" / "last.pt")
    return run_dir


TI2 = dict(input_size=8, patch_size=2, hidden_size=128, depth=6, num_heads=4, num_classes=10)  # DiT-Ti/2 on 8x8x4


@pytest.mark.parametrize("where", ["run dir", "checkpoint", "weights only, config.json"])
def test_a_run_without_label_dropout_reloads_with_all_its_classes(tmp_path, where, recwarn):
    """class_dropout_prob 0: no null row, so 10 rows are 10 classes (inferring from shapes said 9)."""
    model = perturb(DiT(**TI2, class_dropout_prob=0.0), seed=2)
    run_dir = minidit_run(tmp_path, model, class_dropout_prob=0.0)
    path = {"run dir": run_dir, "checkpoint": run_dir / "checkpoints" / "last.pt"}.get(where)
    if path is None:  # a checkpoint of bare weights in the run: the run's config.json decides
        path = run_dir / "checkpoints" / "ema.pt"
        ck.save_checkpoint(model.state_dict(), path)
    rebuilt = ck.model_from_checkpoint(path)
    assert (rebuilt.num_classes, rebuilt.y_embedder.dropout_prob, rebuilt.num_heads) == (10, 0.0, 4)
    x, t, _ = inputs()
    y = torch.tensor([0, 3, 9])  # no null label here
    assert torch.equal(rebuilt(x, t, y), model(x, t, y))
    assert not [w for w in recwarn if issubclass(w.category, ck.CheckpointWarning)]
    sd, meta = ck.read_checkpoint(path)
    assert meta["run_dir"] == run_dir and meta["train_config"]["class_dropout_prob"] == 0.0


def test_foreign_state_dict_says_what_was_assumed(tmp_path):
    model = perturb(small_dit(), seed=0)
    ck.save_checkpoint(model.state_dict(), tmp_path / "w.pt")
    with pytest.warns(ck.CheckpointWarning) as record:
        rebuilt = ck.model_from_checkpoint(tmp_path / "w.pt", num_heads=4)
    assert len(record) == 1 and "assuming 10 classes plus a null class (class_dropout_prob 0.1" in str(
        record[0].message
    )
    assert rebuilt.num_classes == 10
    # told the number of classes (e.g. by the reference trainer's args), nothing is assumed
    assert ck.infer_config(model.state_dict(), num_classes=11)["class_dropout_prob"] == 0.0
    with pytest.raises(CheckpointError, match="label table has 11 rows"):
        ck.infer_config(model.state_dict(), num_classes=5)


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("noise_schedule", "quadratic", "noise_schedule 'quadratic', not one of linear, cosine"),
        ("diffusion_steps", 0, "diffusion_steps 0, not a positive integer"),
        ("diffusion_steps", "1000", "diffusion_steps '1000'"),
        ("class_dropout_prob", 1.5, "class_dropout_prob 1.5"),
        ("model", "DiT-Q/2", "unknown model 'DiT-Q/2'"),
    ],
)
def test_bad_run_config_is_one_line(tmp_path, field, value, message):
    run_dir = minidit_run(tmp_path, perturb(DiT(**TI2), seed=2), **{field: value})
    with pytest.raises(CheckpointError, match=re.escape(message)):
        ck.model_from_checkpoint(run_dir)


def test_ema_entry_that_is_not_a_state_dict_is_refused(tmp_path):
    model = perturb(small_dit(), seed=0)
    torch.save({"model": model.state_dict(), "ema": [1, 2]}, tmp_path / "c.pt")
    with pytest.raises(CheckpointError, match="'ema' entry is a list, not a state dict"):
        ck.load_state_dict(tmp_path / "c.pt")
    assert_same_state(ck.load_state_dict(tmp_path / "c.pt", prefer_ema=False), model.state_dict())


def test_nan_weights_are_refused(tmp_path):
    model = perturb(small_dit(), seed=0)
    with torch.no_grad():
        model.blocks[1].mlp.fc2.weight[0, 0] = float("nan")
    ck.save_checkpoint(model.state_dict(), tmp_path / "nan.pt")
    with pytest.raises(CheckpointError, match=r"NaN/inf \(blocks\.1\.mlp\.fc2\.weight\)"):
        ck.model_from_checkpoint(tmp_path / "nan.pt", num_heads=4, num_classes=10)


def test_empty_dir_and_partial_diffusers_files_are_one_line(tmp_path, exported):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="neither a minidit run directory .* nor a diffusers directory"):
        ck.model_from_checkpoint(tmp_path / "empty")
    _, _, out_dir = exported
    partial = ck.read_file(out_dir / "diffusion_pytorch_model.safetensors")
    del partial["proj_out_2.weight"]
    ck.save_checkpoint(partial, tmp_path / "partial.safetensors")
    with pytest.raises(CheckpointError, match="incomplete diffusers state dict: 'proj_out_2.weight' is missing"):
        ck.load_state_dict(tmp_path / "partial.safetensors", input_size=8)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not readable JSON"):
        ck.load_state_dict(tmp_path / "bad")


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/etc/passwd", "sub/x.safetensors", "..", "a\\b"])
def test_sharded_diffusers_index_names_stay_in_their_directory(tmp_path, exported, shard):
    _, _, out_dir = exported
    d = tmp_path / "sharded" / "dit"
    d.mkdir(parents=True)
    (d / "config.json").write_bytes((out_dir / "config.json").read_bytes())
    keys = ck.read_file(out_dir / "diffusion_pytorch_model.safetensors")
    shutil.copy(out_dir / "diffusion_pytorch_model.safetensors", tmp_path / "sharded" / "outside.safetensors")
    index = {"weight_map": {k: shard for k in keys}}
    (d / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="refused: shard name .* is not a file in that directory"):
        ck.load_state_dict(d)
