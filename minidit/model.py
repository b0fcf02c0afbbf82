"""The Diffusion Transformer (DiT) with adaLN-Zero, as in Peebles & Xie (2023).

Lessons 02-04. Reading order follows the paper's Figure 3:

    latent x [B, C, I, I] --patchify--> tokens [B, T, D] (+ fixed pos_embed)
    condition c = t_embedder(t) + y_embedder(y)                         [B, D]
    N x DiTBlock(tokens, c)        (adaLN-Zero: shift, scale, gate from c)
    final_layer(tokens, c) --unpatchify--> [B, 2C, I, I] = (epsilon, v)

Parameter names and numerics match the reference release, so its checkpoints
load with ``strict=True`` and give the same outputs.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.utils.checkpoint
from torch import nn

from .attention import Attention
from .embed import LabelEmbedder, PatchEmbed, TimestepEmbedder, get_2d_sincos_pos_embed, unpatchify


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Adaptive layer-norm modulation: x * (1 + scale) + shift.

    x: [B, T, D]; shift, scale: [B, D], broadcast over the T tokens. The ``1 +``
    makes a zero scale mean "leave x alone", which adaLN-Zero relies on.
    """
    return x * (1 + scale[:, None]) + shift[:, None]


class Mlp(nn.Module):
    """Pointwise feed-forward: Linear(D, 4D) -> GELU (tanh approximation) -> Linear(4D, D)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim, bias=True)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_dim, dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """A transformer block with adaLN-Zero conditioning. x: [B, T, D], c: [B, D] -> [B, T, D].

    The condition regresses six vectors (in this order): shift, scale and gate for
    the attention branch, then shift, scale and gate for the MLP branch:

        x = x + gate_msa * Attn(modulate(LN(x), shift_msa, scale_msa))
        x = x + gate_mlp * MLP(modulate(LN(x), shift_mlp, scale_mlp))

    ``DiT.initialize_weights`` zeroes the regressing Linear, so every gate is 0 and each
    block of a fresh DiT is the identity ("-Zero"); a standalone block keeps PyTorch's init.
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, attn_backend: str = "sdpa"):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads=num_heads, backend=attn_backend)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        # The released weights fix the layout of the 6D regressed values: the attention branch's
        # (shift, scale, gate) first, then the MLP branch's, D values each.
        attn_params, mlp_params = self.adaLN_modulation(c).chunk(2, dim=1)  # [B, 3D] each
        x = residual_branch(x, self.norm1, self.attn, attn_params)
        return residual_branch(x, self.norm2, self.mlp, mlp_params)


def residual_branch(x: torch.Tensor, norm: nn.Module, sublayer: nn.Module, params: torch.Tensor) -> torch.Tensor:
    """One adaLN-Zero branch: x + gate * sublayer(modulate(norm(x), shift, scale)).

    x: [B, T, D]; params: [B, 3D] = (shift, scale, gate) -> [B, T, D]."""
    shift, scale, gate = params.chunk(3, dim=1)
    return x + gate[:, None] * sublayer(modulate(norm(x), shift, scale))


class FinalLayer(nn.Module):
    """adaLN (shift, scale: in that order) -> Linear to p*p*out_channels per token.

    x: [B, T, D], c: [B, D] -> [B, T, p*p*out_channels].
    """

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)  # this order: the released weights'
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    """Diffusion model with a Transformer backbone.

    Args mirror the reference: ``input_size`` is the latent side I (32 for
    256 px images through the f8 VAE), ``patch_size`` p, ``in_channels`` C,
    ``hidden_size`` D, ``depth`` N blocks, ``num_heads`` H, ``mlp_ratio``,
    ``class_dropout_prob`` (label dropout for CFG), ``num_classes`` K and
    ``learn_sigma`` (output 2C channels: epsilon and the variance interpolant v).
    ``attn_backend`` is one of "sdpa", "math", "flash_attn";
    ``grad_checkpointing`` recomputes each block in the backward pass.
    """

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = True,
        attn_backend: str = "sdpa",
        grad_checkpointing: bool = False,
    ):
        super().__init__()
        self.input_size = input_size
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.num_classes = num_classes
        self.learn_sigma = learn_sigma
        self.grad_checkpointing = grad_checkpointing

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        # Fixed sin-cos table, kept as a frozen parameter: it is in the state dict.
        self.pos_embed = nn.Parameter(torch.zeros(1, self.x_embedder.num_patches, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList(
            [DiTBlock(hidden_size, num_heads, mlp_ratio=mlp_ratio, attn_backend=attn_backend) for _ in range(depth)]
        )
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    # -- initialisation (paper section 3.2, "adaLN-Zero") -------------------------

    def initialize_weights(self) -> None:
        """Xavier-uniform Linears with zero bias; N(0, 0.02) label table and timestep MLP;
        the sin-cos position table; and zeros for every adaLN regressor and the output layer.

        The random draws come in the reference's order, so one seed gives the reference's weights."""
        # 1. Every Linear, in module order (leaves come in the same order pre- or post-order).
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        # 2. The fixed position table (no draws).
        table = get_2d_sincos_pos_embed(self.hidden_size, self.x_embedder.grid_size)  # [T, D] float64
        self.pos_embed.data.copy_(torch.from_numpy(table).float()[None])
        # 3. The patch embedding is a Linear on flattened patches: Xavier over its [D, C*p*p] view.
        proj = self.x_embedder.proj
        nn.init.xavier_uniform_(proj.weight.data.view(proj.out_channels, -1))
        nn.init.zeros_(proj.bias)
        # 4. N(0, 0.02): the label table, then the timestep MLP's two weights.
        for weight in (self.y_embedder.embedding_table.weight, self.t_embedder.mlp[0].weight,
                       self.t_embedder.mlp[2].weight):  # fmt: skip
            nn.init.normal_(weight, std=0.02)
        # 5. adaLN-Zero: every regressor and the output Linear start at zero (no draws).
        zeroed = [block.adaLN_modulation[-1] for block in self.blocks]
        zeroed += [self.final_layer.adaLN_modulation[-1], self.final_layer.linear]
        for layer in zeroed:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    # -- switches ------------------------------------------------------------------

    @property
    def attn_backend(self) -> str:
        return self.blocks[0].attn.backend if len(self.blocks) else "sdpa"

    def set_attn_backend(self, backend: str) -> DiT:
        """Switch every block to the attention backend "sdpa", "math" or "flash_attn"."""
        from .attention import BACKENDS

        if backend not in BACKENDS:
            raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")
        for block in self.blocks:
            block.attn.backend = backend
        return self

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """The shape of one input (and of one sample's noise): (C, I, I)."""
        return (self.in_channels, self.input_size, self.input_size)

    # -- forward -------------------------------------------------------------------

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, p*p*out_channels] -> [B, out_channels, I, I]."""
        return unpatchify(x, self.patch_size, self.out_channels)

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, force_drop_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x: [B, C, I, I] noisy latents, t: [B] step indices, y: [B] labels -> [B, out_channels, I, I].

        In training mode each label is replaced by the null label with
        probability ``class_dropout_prob``; in eval mode labels are used as given.
        ``force_drop_ids`` ([B], 1 = drop) replaces the coin flips: the trainer draws
        them itself so that a run is reproducible whatever the number of GPUs.
        """
        x = self.x_embedder(x) + self.pos_embed  # [B, T, D]
        c = self.t_embedder(t) + self.y_embedder(y, self.training, force_drop_ids)  # [B, D]
        for block in self.blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, c, use_reentrant=False)
            else:
                x = block(x, c)
        x = self.final_layer(x, c)  # [B, T, p*p*out_channels]
        return self.unpatchify(x)

    def forward_with_cfg(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        cfg_scale: float,
        guided_channels: int | None = 3,
    ) -> torch.Tensor:
        """Classifier-free guidance in one batched forward pass.

        The batch holds two halves: the first with the real labels, the second
        with the null label ``num_classes``; only the first half of ``x`` is
        read and is used for both. Returns [B, out_channels, I, I] where both
        halves carry the guided prediction

            eps = eps_uncond + cfg_scale * (eps_cond - eps_uncond).

        ``guided_channels=3`` (the default) guides only the first three channels,
        exactly as the reference does: a leftover from GLIDE, whose RGB pixel
        model had three channels, that the DiT authors kept for exact
        reproducibility of their FID 2.27 (scale 1.5). The fourth latent channel
        and the variance channels are not guided: each half keeps its own prediction
        there (conditional in the first half, unconditional in the second). Pass ``guided_channels=None``
        to guide all ``in_channels`` epsilon channels, as diffusers does (scale
        1.375 on all four channels is roughly equivalent to 1.5 on three).
        """
        n = self.in_channels if guided_channels is None else guided_channels
        if not 0 < n <= self.in_channels:
            raise ValueError(f"guided_channels must be in 1..{self.in_channels} or None, got {guided_channels}")
        if x.shape[0] % 2:
            raise ValueError(f"forward_with_cfg needs an even batch (real labels, then null labels), got {x.shape[0]}")
        B = x.shape[0] // 2
        z = x[:B]
        out = self.forward(torch.cat([z, z]), t, y)  # [2B, out_channels, I, I]
        cond, uncond = out[:B, :n], out[B:, :n]
        guided = uncond + cfg_scale * (cond - uncond)  # [B, n, I, I]
        return torch.cat([torch.cat([guided, guided]), out[:, n:]], dim=1)


# --------------------------------------------------------------------------
# The model zoo: the paper's Table 1 (sizes S, B, L, XL after ViT) x patch sizes 8, 4, 2
# --------------------------------------------------------------------------

#: The one registry: name -> (depth N, hidden size d, heads, patch size p). The twelve rows of the
#: paper's Table 1 (each size at p = 2, 4, 8), plus DiT-Ti (not in the paper: depth 6, width 128,
#: 4 heads of 32) for laptop runs on the toy data.
MODELS: dict[str, tuple[int, int, int, int]] = {
    "DiT-XL/2": (28, 1152, 16, 2), "DiT-XL/4": (28, 1152, 16, 4), "DiT-XL/8": (28, 1152, 16, 8),
    "DiT-L/2": (24, 1024, 16, 2), "DiT-L/4": (24, 1024, 16, 4), "DiT-L/8": (24, 1024, 16, 8),
    "DiT-B/2": (12, 768, 12, 2), "DiT-B/4": (12, 768, 12, 4), "DiT-B/8": (12, 768, 12, 8),
    "DiT-S/2": (12, 384, 6, 2), "DiT-S/4": (12, 384, 6, 4), "DiT-S/8": (12, 384, 6, 8),
    "DiT-Ti/2": (6, 128, 4, 2), "DiT-Ti/4": (6, 128, 4, 4), "DiT-Ti/8": (6, 128, 4, 8),
}  # fmt: skip


def create_model(name: str, **kwargs) -> DiT:
    """``create_model("DiT-XL/2", input_size=32, num_classes=1000)``: a DiT by its name in ``MODELS``."""
    depth, hidden_size, num_heads, patch_size = MODELS[name]
    return DiT(depth=depth, hidden_size=hidden_size, num_heads=num_heads, patch_size=patch_size, **kwargs)


#: The reference's spelling, ``DiT_models["DiT-XL/2"](input_size=32, num_classes=1000)``, for code
#: written against its ``models.py``: a view of ``MODELS``, not a second table.
DiT_models: dict[str, Callable[..., DiT]] = {name: partial(create_model, name) for name in MODELS}
