import pytest
import torch

import minidit


def perturbed(model: torch.nn.Module, std: float = 0.02, seed: int = 0) -> torch.nn.Module:
    """Add noise to every trainable weight: a fresh DiT outputs exactly 0 (adaLN-Zero),
    so comparisons on a fresh model would prove nothing."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * std)
    return model


@pytest.fixture
def small_dit():
    """A perturbed 2-block DiT on 8x8x4 inputs, 10 classes, in eval mode."""
    torch.manual_seed(0)
    model = minidit.DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4, num_classes=10)
    return perturbed(model).eval()


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
