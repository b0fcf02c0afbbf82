"""minidit: the Diffusion Transformer (Peebles & Xie, 2023), small enough to read, exact enough to trust.

from minidit import DiT_models, create_diffusion
model = DiT_models["DiT-XL/2"](input_size=32, num_classes=1000)
diffusion = create_diffusion("250")
"""

from .diffusion import GaussianDiffusion, create_diffusion
from .model import DiT, DiT_models

__version__ = "0.1.0"
__all__ = [
    "DiT", "DiT_models", "GaussianDiffusion", "create_diffusion", "model_stats",
    "load_checkpoint", "load_state_dict", "save_checkpoint", "export_diffusers", "download", "find_model",
]  # fmt: skip

_LAZY = {
    "model_stats": "stats",
    "load_checkpoint": "checkpoint",
    "load_state_dict": "checkpoint",
    "save_checkpoint": "checkpoint",
    "export_diffusers": "checkpoint",
    "find_model": "checkpoint",
    "download": "checkpoint",
}


def __getattr__(name: str):
    # Imported on first use, so that `python -m minidit.stats` (etc.) run cleanly.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'minidit' has no attribute {name!r}")
