"""Mixed precision in the trainer: the model runs under autocast, the losses are computed in fp32.

Under bf16/fp16 autocast the model's output is low precision; the MSE and, above all, the VB
term (a log-variance interpolated from the output, then a KL in bits) must be computed from
that output cast to float32, outside autocast. Checked on the CPU with bf16 autocast.
"""

import pytest
import torch

from minidit import train
from minidit.diffusion import GaussianDiffusion


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_fp32_output_runs_the_model_under_autocast_and_returns_fp32(small_dit):
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 500]), torch.tensor([1, 2])
    assert train.fp32_output(small_dit, "cpu", None) is small_dit
    net = train.fp32_output(small_dit, "cpu", torch.bfloat16)
    inner = []
    hook = small_dit.final_layer.linear.register_forward_hook(lambda m, i, o: inner.append(o.dtype))
    try:
        out = net(x, t, y)
    finally:
        hook.remove()
    assert inner == [torch.bfloat16] and out.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(out, small_dit(x, t, y).float())


def test_losses_are_fp32_under_bf16_autocast(tmp_path, monkeypatch):
    seen = {"inner": [], "outer": [], "vb": []}
    real_losses, real_vb = GaussianDiffusion.training_losses, GaussianDiffusion._vb_terms_bpd

    def training_losses(self, model, x_start, t, model_kwargs=None, noise=None):
        def spy(*args, **kwargs):
            out = model(*args, **kwargs)
            seen["outer"].append((out.dtype, torch.is_autocast_enabled("cpu")))
            return out

        losses = real_losses(self, spy, x_start, t, model_kwargs=model_kwargs, noise=noise)
        seen["losses"] = {k: v.dtype for k, v in losses.items()} | {"x_start": x_start.dtype, "noise": noise.dtype}
        return losses

    def vb_terms(self, model_output, x_start, x_t, t):
        seen["vb"].append((model_output.dtype, x_t.dtype, torch.is_autocast_enabled("cpu")))
        return real_vb(self, model_output, x_start, x_t, t)

    real_build = train.build_model

    def build_model(cfg, spec):
        model = real_build(cfg, spec)
        model.final_layer.linear.register_forward_hook(lambda m, i, o: seen["inner"].append(o.dtype))
        return model

    monkeypatch.setattr(GaussianDiffusion, "training_losses", training_losses)
    monkeypatch.setattr(GaussianDiffusion, "_vb_terms_bpd", vb_terms)
    monkeypatch.setattr(train, "build_model", build_model)
    argv = ["--model", "DiT-Ti/8", "--global-batch-size", "4", "--max-steps", "2", "--log-every", "1"]
    argv += ["--sample-every", "0", "--eval-samples", "0", "--device", "cpu", "--precision", "bf16"]
    argv += ["--micro-batch-size", "2", "--sample-steps", "2", "--run-dir", str(tmp_path / "run")]
    assert train.main(argv) == 0
    assert seen["inner"][:4] == [torch.bfloat16] * 4  # the model ran under bf16 autocast (2 steps x 2 micro)
    assert seen["outer"] == [(torch.float32, False)] * 4  # the diffusion got its output in fp32, outside autocast
    assert seen["vb"] == [(torch.float32, torch.float32, False)] * 4
    assert set(seen["losses"].values()) == {torch.float32}
