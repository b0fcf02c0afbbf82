"""The shipped toy DiT (data/toy_dit.safetensors): it loads strictly, with its run's config, and samples what
it sampled when it was made (tests/data/toy_dit_sample.safetensors, made by the call in that file's metadata)."""

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from minidit import toy
from minidit.checkpoint import model_from_checkpoint, read_checkpoint
from minidit.errors import UserError
from minidit.sample import generate

STORED = Path(__file__).parent / "data" / "toy_dit_sample.safetensors"


def test_shipped_toy_dit_loads_strictly_with_its_config():
    model, config = toy.load_toy_dit()
    assert not model.training and next(model.parameters()).dtype == torch.float32
    assert (config["noise_schedule"], config["image_size"], config["model"]) == ("cosine", 16, "DiT-Ti/4")
    assert config["class_names"] == toy.CLASS_NAMES and model.num_classes == toy.NUM_CLASSES
    sd, meta = read_checkpoint(toy.DEFAULT_DIT)
    assert set(sd) == set(model.state_dict())  # every key, nothing extra: the load was strict
    assert meta["train_config"]["noise_schedule"] == "cosine"  # the sampler CLI reads the schedule from here
    assert torch.equal(model.pos_embed, model_from_checkpoint(toy.DEFAULT_DIT).pos_embed)
    assert toy.DEFAULT_DIT.stat().st_size < 5 * 2**20


def test_shipped_toy_dit_reproduces_its_stored_sample():
    stored = load_file(str(STORED))
    with safe_open(str(STORED), framework="pt") as f:
        assert "clip_denoised=True" in f.metadata()["made_by"]
    model, config = toy.load_toy_dit()
    x = generate(
        model, stored["labels"], cfg_scale=4.0, num_steps=10, sampler="ddim", seed=0,
        noise_schedule=config["noise_schedule"], clip_denoised=True,
    )  # fmt: skip
    torch.testing.assert_close(x, stored["samples"], atol=1e-4, rtol=0)
    assert toy.classify(x).tolist() == stored["labels"].tolist()  # a red circle and a blue ring, recognised


def test_missing_or_foreign_toy_dit_is_one_line(tmp_path):
    with pytest.raises(UserError, match="export-dit"):
        toy.load_toy_dit(tmp_path / "none.safetensors")
    foreign = tmp_path / "bare.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in load_file(str(toy.DEFAULT_DIT)).items()}, str(foreign))  # no config
    with pytest.raises(UserError, match="not a toy DiT file"):
        toy.load_toy_dit(foreign)


def test_shipped_flow_toy_dit_is_a_flow_run_that_draws_its_classes():
    """data/toy_flow_dit.safetensors (lesson 11): the toy recipe trained with ``--objective flow``."""
    model, config = toy.load_toy_dit(flow=True)
    assert (config["objective"], config["model"], config["max_steps"]) == ("flow", "DiT-Ti/4", 6000)
    assert toy.DEFAULT_FLOW_DIT.stat().st_size < 5 * 2**20
    labels = torch.arange(toy.NUM_CLASSES)
    x = generate(model, labels, cfg_scale=4.0, num_steps=10, sampler="euler", seed=0, objective="flow")
    assert x.shape == (10, 3, 16, 16) and x.abs().max() < 1.5
    assert (toy.classify(x) == labels).float().mean() >= 0.9


def test_missing_flow_toy_dit_names_the_flow_command(tmp_path):
    with pytest.raises(UserError, match="--objective flow"):
        toy.load_toy_dit(tmp_path / "none.safetensors", flow=True)
