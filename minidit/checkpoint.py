"""Checkpoints: safe loading, the reference and diffusers layouts, verified downloads (lessons 04, 08).

Formats read by ``load_state_dict``:

- a bare state dict in the reference layout (the released ``DiT-XL-2-256x256.pt``);
- a reference training checkpoint ``{"model", "ema", "opt", "args"}`` (``ema`` preferred);
- a minidit training checkpoint (the same keys, plus step and RNG states);
- a diffusers ``DiTTransformer2DModel`` directory (``save_pretrained`` output, or a
  pipeline directory with ``transformer/``) or its ``.safetensors`` file;
- any ``.safetensors`` file holding one of the layouts above.

Nothing is ever unpickled beyond tensors and plain containers: ``.safetensors``
files are read with safetensors, everything else with
``torch.load(weights_only=True)``. A file that needs more is refused, with the reason.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import http.client
import json
import os
import pickle
import pickletools
import re
import urllib.error
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import CHOICES
from .errors import UserError
from .fileio import atomic_write, read_json, write_json
from .model import MODELS, DiT, create_model


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be read or does not fit: the message says why, in one line."""


class CheckpointWarning(UserWarning):
    """Something about a checkpoint had to be assumed (printed as one line by the command-line tools)."""


# --------------------------------------------------------------------------
# Safe reading, and saving (atomic: minidit.fileio)
# --------------------------------------------------------------------------


def read_file(path: str | os.PathLike, kind: str | None = None) -> dict[str, Any]:
    """Read a checkpoint file without executing code: safetensors, or ``torch.load(weights_only=True)``.

    ``kind`` ("safetensors" or "torch") defaults to what the file name says.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if (kind or ("safetensors" if path.suffix == ".safetensors" else "torch")) == "safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path}: not a readable safetensors file (truncated or corrupt?): {e}") from None
    try:
        # The reference's training checkpoints store their argparse.Namespace under "args":
        # allow that plain attribute bag (it runs no code), nothing else.
        with _safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        code = next((line for line in lines if "GLOBAL" in line), None) or _pickle_global(path)
        if code is not None:
            raise CheckpointError(
                f"{path}: refused: loading it would import and call arbitrary Python code ({code}). minidit "
                "only loads tensors and plain containers (torch.load(weights_only=True)) or safetensors; "
                "re-save the weights as a plain state dict from an environment you trust."
            ) from None
        detail = next((line for line in lines if "Unsupported" in line), lines[-1] if lines else "")
        raise CheckpointError(
            f"{path}: not loadable with torch.load(weights_only=True): truncated, corrupt, or a pickle of "
            f"Python objects ({detail})"
        ) from None
    except Exception as e:  # a damaged file can make the unpickler raise anything: IndexError, KeyError, ...
        first = str(e).strip().splitlines()[0].split(". ")[0] if str(e).strip() else ""  # torch adds paragraphs
        first = f"{type(e).__name__}: {first}" if first else type(e).__name__
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated or corrupt?): {first}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    return obj


def _safe_globals(classes: list[type]):
    """``torch.serialization.safe_globals(classes)``; torch 2.4 (the oldest minidit supports) lacks the context
    manager, and only allows them process-wide with ``add_safe_globals``."""
    if hasattr(torch.serialization, "safe_globals"):  # torch >= 2.5
        return torch.serialization.safe_globals(classes)
    torch.serialization.add_safe_globals(classes)
    return contextlib.nullcontext()


def _pickle_global(path: Path) -> str | None:
    """The first global a plain ``pickle.dump`` file would import, read from its opcodes with
    pickletools (which executes nothing); None unless the file is one complete pickle.

    Why it stays: ``torch.load(weights_only=True)`` alone already refuses every code-running file (nothing
    here decides that), but for a plain pickle in protocol 0, 4 or 5 it stops at the first opcode it does
    not support ("Unsupported operand 100" or 149, FRAME) before it sees the global, so its message cannot
    say what was refused; and its message is several paragraphs whose first advice is to retry with
    ``weights_only=False``. ``read_file`` turns that into one line naming the global (e.g. ``builtins.exec``;
    test_checkpoint's ``test_code_running_pickle_is_refused[pickle]`` and ``[pickle-0]`` need this scan).
    """
    found, strings = None, []
    try:
        with open(path, "rb") as f:
            for op, arg, _ in pickletools.genops(f):
                if found is None and op.name in ("GLOBAL", "INST"):
                    found = "GLOBAL " + str(arg).replace(" ", ".")
                elif found is None and op.name == "STACK_GLOBAL":
                    found = "GLOBAL " + ".".join(strings[-2:])
                elif isinstance(arg, str):
                    strings.append(arg)
    except Exception:  # not a complete pickle: truncated or not a pickle at all
        return None
    return found


def save_checkpoint(obj: dict[str, Any], path: str | os.PathLike) -> None:
    """Save a state dict (or a training checkpoint of tensors and plain containers) atomically.

    ``.safetensors`` paths take a flat dict of tensors; anything else is written with
    ``torch.save`` and must load back with ``torch.load(weights_only=True)``.
    """
    if str(path).endswith(".safetensors"):
        from safetensors.torch import save_file

        tensors = {k: v.detach().contiguous() for k, v in obj.items()}
        atomic_write(path, lambda tmp: save_file(tensors, tmp))
    else:
        atomic_write(path, lambda tmp: torch.save(obj, tmp))


# --------------------------------------------------------------------------
# Layouts
# --------------------------------------------------------------------------

_PREFIXES = ("module.", "_orig_mod.")  # DDP and torch.compile wrappers


def _strip_prefixes(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        changed = True
        while changed:
            changed = False
            for p in _PREFIXES:
                if k.startswith(p):
                    k, changed = k[len(p) :], True
        out[k] = v
    return out


def is_diffusers_layout(sd: dict[str, Any]) -> bool:
    return any(k.startswith("transformer_blocks.") for k in sd)


def from_diffusers(sd: dict[str, torch.Tensor], input_size: int | None = None) -> dict[str, torch.Tensor]:
    """Convert a diffusers ``DiTTransformer2DModel`` state dict to the reference layout.

    The timestep MLP and label table, repeated in every diffusers block, are taken
    from block 0; q, k, v are fused back into ``qkv``; ``pos_embed`` (not stored by
    diffusers) is recomputed for the grid, whose side is ``input_size / p`` (by
    default the largest that ``sample_size`` could be: read from the config).
    """
    try:
        return _from_diffusers(sd, input_size)
    except KeyError as e:
        raise CheckpointError(f"an incomplete diffusers state dict: {e} is missing (a partial file?)") from None


#: Reference name -> diffusers name of the weights both layouts store once: at the top level, in every block
#: (``blocks.{i}.`` / ``transformer_blocks.{i}.``), and the embedders, which diffusers copies into every block
#: (``norm1.emb.``; block 0's copy is the one). q, k, v (fused in the reference) and pos_embed (not stored by
#: diffusers) are converted apart.
TOP_NAMES = {"x_embedder.proj": "pos_embed.proj", "final_layer.adaLN_modulation.1": "proj_out_1",
             "final_layer.linear": "proj_out_2"}  # fmt: skip
BLOCK_NAMES = {"attn.proj": "attn1.to_out.0", "mlp.fc1": "ff.net.0.proj", "mlp.fc2": "ff.net.2",
               "adaLN_modulation.1": "norm1.linear"}  # fmt: skip
EMBEDDER_NAMES = {"t_embedder.mlp.0.weight": "timestep_embedder.linear_1.weight",
                  "t_embedder.mlp.0.bias": "timestep_embedder.linear_1.bias",
                  "t_embedder.mlp.2.weight": "timestep_embedder.linear_2.weight",
                  "t_embedder.mlp.2.bias": "timestep_embedder.linear_2.bias",
                  "y_embedder.embedding_table.weight": "class_embedder.embedding_table.weight"}  # fmt: skip


def _key_pairs(depth: int) -> list[tuple[str, str]]:
    """(reference key, diffusers key) for every weight in ``TOP_NAMES``, ``BLOCK_NAMES`` and ``EMBEDDER_NAMES``."""
    pairs = [(f"{r}.{kind}", f"{d}.{kind}") for r, d in TOP_NAMES.items() for kind in ("weight", "bias")]
    pairs += [(r, "transformer_blocks.0.norm1.emb." + d) for r, d in EMBEDDER_NAMES.items()]
    for i in range(depth):
        pairs += [(f"blocks.{i}.{r}.{kind}", f"transformer_blocks.{i}.{d}.{kind}")
                  for r, d in BLOCK_NAMES.items() for kind in ("weight", "bias")]  # fmt: skip
    return pairs


def _depth(sd: dict[str, Any], prefix: str) -> int:
    """The number of DiT blocks in ``sd``: 1 + the largest i of its ``<prefix>.<i>.`` keys."""
    return 1 + max(int(m.group(1)) for k in sd if (m := re.match(prefix + r"\.(\d+)\.", k)))


def _from_diffusers(sd: dict[str, torch.Tensor], input_size: int | None) -> dict[str, torch.Tensor]:
    from .embed import get_2d_sincos_pos_embed

    depth = _depth(sd, "transformer_blocks")
    out = {r: sd[d] for r, d in _key_pairs(depth)}
    b0 = "transformer_blocks.0.norm1.emb."
    for i in range(1, depth):  # diffusers stores a copy per block; the reference has one
        for k in (k[len(b0) :] for k in sd if k.startswith(b0)):
            copy = sd.get(f"transformer_blocks.{i}.norm1.emb.{k}")
            if copy is None or not torch.equal(copy, sd[b0 + k]):
                raise CheckpointError(
                    f"transformer_blocks.{i}.norm1.emb.{k} differs from block 0's copy: the reference layout "
                    "has one timestep and label embedder shared by all blocks (fine-tuned in diffusers?)"
                )
    for i in range(depth):
        for kind in ("weight", "bias"):
            qkv = [sd[f"transformer_blocks.{i}.attn1.to_{n}.{kind}"] for n in "qkv"]
            out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat(qkv, dim=0)
    D, _, p, _ = out["x_embedder.proj.weight"].shape
    if input_size is None:
        raise CheckpointError("a diffusers state dict does not store the input size: pass input_size (sample_size)")
    grid = input_size // p
    out["pos_embed"] = torch.from_numpy(get_2d_sincos_pos_embed(D, grid)).float().unsqueeze(0)
    return out


def to_diffusers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Convert a reference-layout state dict to diffusers' ``DiTTransformer2DModel`` layout
    (the timestep MLP and label table are copied into every block; pos_embed is dropped)."""
    sd = _strip_prefixes(sd)
    depth = _depth(sd, "blocks")
    out = {d: sd[r] for r, d in _key_pairs(depth)}
    for i in range(depth):
        for r, d in EMBEDDER_NAMES.items():
            out[f"transformer_blocks.{i}.norm1.emb.{d}"] = sd[r].clone()
        for kind in ("weight", "bias"):
            for n, w in zip("qkv", sd[f"blocks.{i}.attn.qkv.{kind}"].chunk(3, dim=0)):
                out[f"transformer_blocks.{i}.attn1.to_{n}.{kind}"] = w
    return {k: v.contiguous() for k, v in out.items()}


def diffusers_config(model: DiT) -> dict[str, Any]:
    """The ``config.json`` of a diffusers ``DiTTransformer2DModel`` equivalent to ``model``."""
    mlp_ratio = model.blocks[0].mlp.fc1.out_features / model.hidden_size
    if mlp_ratio != 4.0 or model.y_embedder.dropout_prob <= 0:
        raise CheckpointError(
            "diffusers' DiTTransformer2DModel needs mlp_ratio 4 and a null class (class_dropout_prob > 0)"
        )
    return {
        "_class_name": "DiTTransformer2DModel",
        "num_attention_heads": model.num_heads,
        "attention_head_dim": model.hidden_size // model.num_heads,
        "in_channels": model.in_channels,
        "out_channels": model.out_channels,
        "num_layers": len(model.blocks),
        "dropout": 0.0,
        "norm_num_groups": 32,
        "attention_bias": True,
        "sample_size": model.input_size,
        "patch_size": model.patch_size,
        "activation_fn": "gelu-approximate",
        "num_embeds_ada_norm": model.num_classes,
        "upcast_attention": False,
        "norm_type": "ada_norm_zero",
        "norm_elementwise_affine": False,
        # diffusers' default (and its hub configs) is 1e-5 for the LayerNorm before the MLP;
        # the reference uses 1e-6 everywhere, and writing it here removes that difference.
        "norm_eps": 1e-6,
    }


def export_diffusers(model: DiT, out_dir: str | os.PathLike) -> Path:
    """Write ``model`` as a diffusers ``DiTTransformer2DModel`` directory (``config.json`` and
    ``diffusion_pytorch_model.safetensors``), loadable with ``DiTTransformer2DModel.from_pretrained``.

    diffusers' DiT differs from the reference in two numeric details (see the README):
    its LayerNorm before the MLP uses eps 1e-5 (its default; this export writes
    ``norm_eps: 1e-6`` into the config, which removes that difference), and its
    timestep frequencies are exp(-ln(10^4) i / 127) instead of / 128, which no
    config field changes. With the frequencies patched back, outputs agree exactly.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = diffusers_config(model)
    save_checkpoint(to_diffusers(model.state_dict()), out_dir / "diffusion_pytorch_model.safetensors")
    write_json(out_dir / "config.json", config)
    return out_dir


def _read_diffusers_dir(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    if (path / "transformer" / "config.json").is_file():
        path = path / "transformer"
    if not (path / "config.json").is_file():
        raise CheckpointError(
            f"{path}: neither a minidit run directory (checkpoints/last.pt) nor a diffusers directory (config.json)"
        )
    config = read_json(path / "config.json", CheckpointError)
    single = path / "diffusion_pytorch_model.safetensors"
    index = path / "diffusion_pytorch_model.safetensors.index.json"
    if single.is_file():
        return read_file(single), config
    if index.is_file():
        weight_map = read_json(index, CheckpointError).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: no 'weight_map' in it")
        sd: dict[str, torch.Tensor] = {}
        for shard in sorted(set(map(str, weight_map.values()))):
            if shard in ("", ".", "..") or "/" in shard or "\\" in shard or os.path.isabs(shard):
                raise CheckpointError(f"{index}: refused: shard name {shard!r} is not a file in that directory")
            sd.update(read_file(path / shard))
        return sd, config
    if (path / "diffusion_pytorch_model.bin").is_file():
        return read_file(path / "diffusion_pytorch_model.bin"), config
    raise CheckpointError(f"{path}: a diffusers directory needs diffusion_pytorch_model.safetensors")


# --------------------------------------------------------------------------
# Loading into a model
# --------------------------------------------------------------------------


def extract_state_dict(
    obj: dict[str, Any], prefer_ema: bool = True, input_size: int | None = None, source: str = "checkpoint"
) -> dict[str, torch.Tensor]:
    """The model weights inside any supported checkpoint object, in the reference layout."""
    if prefer_ema and "ema" in obj:
        if not isinstance(obj["ema"], dict):
            raise CheckpointError(f"{source}: its 'ema' entry is a {type(obj['ema']).__name__}, not a state dict")
        obj = obj["ema"]
    elif isinstance(obj.get("model"), dict):
        obj = obj["model"]
    elif isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    sd = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if len(sd) != len(obj):
        bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)][:3]
        raise CheckpointError(f"{source}: not a state dict: entries {bad} are not tensors")
    sd = _strip_prefixes(sd)
    if is_diffusers_layout(sd):
        try:
            sd = from_diffusers(sd, input_size=input_size)
        except CheckpointError as e:
            raise CheckpointError(f"{source}: {e}") from None
    return sd


def read_checkpoint(
    path_or_name: str | os.PathLike, prefer_ema: bool = True, input_size: int | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Reference-layout weights, and what the checkpoint records about its model.

    ``path_or_name``: a minidit run directory (its ``checkpoints/last.pt``), a checkpoint file, a
    diffusers directory, or a released name (``"DiT-XL-2-256x256.pt"``, downloaded on first use).
    Returns ``(state dict, meta)``; ``meta["dit"]`` holds the ``DiT`` arguments the checkpoint records
    beyond its shapes (``num_classes``, ``class_dropout_prob``, ``num_heads``, ``learn_sigma``: from a
    minidit run's config, a diffusers config, the reference trainer's ``args``, or the released
    weights' entry); ``meta["train_config"]``, ``meta["class_names"]`` and ``meta["run_dir"]`` are
    set for minidit runs (None otherwise).
    """
    name = str(path_or_name)
    path = Path(name)
    meta: dict[str, Any] = {"dit": {}, "train_config": None, "class_names": None, "run_dir": None}
    if name in PRETRAINED and not path.exists():
        path = download(name)
    if name in PRETRAINED:
        heads = MODELS[PRETRAINED[name].model][2]
        meta["dit"] = {"num_heads": heads, "num_classes": 1000, "class_dropout_prob": 0.1}
    if path.is_dir() and (path / "checkpoints" / "last.pt").is_file():
        path = path / "checkpoints" / "last.pt"
    if path.is_dir():
        sd, config = _read_diffusers_dir(path)
        known = {"num_classes": config.get("num_embeds_ada_norm"), "num_heads": config.get("num_attention_heads")}
        meta["dit"] = {k: v for k, v in known.items() if isinstance(v, int)}
        return extract_state_dict(sd, prefer_ema, input_size or config.get("sample_size"), name), meta
    raw = read_file(path)
    run_dir = path.parent.parent if path.parent.name == "checkpoints" else None
    train_config, names = raw.get("config"), raw.get("class_names")
    if path.suffix == ".safetensors":  # e.g. `python -m minidit.toy export-dit`: the run's config in the metadata
        train_config, names = _safetensors_config(path)
    if not isinstance(train_config, dict) and run_dir is not None and (run_dir / "config.json").is_file():
        train_config = read_json(run_dir / "config.json", CheckpointError).get("config")
    if isinstance(train_config, dict):  # a minidit run: its config says what the shapes cannot
        meta.update(dit=dit_arguments(train_config, str(path)), train_config=train_config, run_dir=run_dir)
        if isinstance(names, list) and names and all(isinstance(n, str) for n in names):
            meta["class_names"] = names
            meta["dit"]["num_classes"] = len(names)
    elif isinstance(raw.get("args"), argparse.Namespace):  # the reference trainer's checkpoints
        args = raw["args"]
        if isinstance(getattr(args, "num_classes", None), int):
            meta["dit"]["num_classes"] = args.num_classes
    return extract_state_dict(raw, prefer_ema, input_size, str(path)), meta


def _safetensors_config(path: Path) -> tuple[dict[str, Any] | None, list | None]:
    """A minidit training config and class names stored as JSON in a safetensors file's metadata, if any."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        info = f.metadata() or {}
    try:
        config = json.loads(info["config"]) if "config" in info else None
        names = json.loads(info["class_names"]) if "class_names" in info else None
    except ValueError as e:
        raise CheckpointError(f"{path}: its metadata holds a config that is not valid JSON ({e})") from None
    return (config if isinstance(config, dict) else None), names


def load_state_dict(
    path_or_name: str | os.PathLike, prefer_ema: bool = True, input_size: int | None = None
) -> dict[str, torch.Tensor]:
    """Reference-layout weights from a file, a diffusers or run directory, or a released name
    (``"DiT-XL-2-256x256.pt"``, downloaded on first use). For a diffusers safetensors
    file without its config, pass ``input_size``."""
    return read_checkpoint(path_or_name, prefer_ema, input_size)[0]


find_model = load_state_dict  # the reference's name, for its users


def dit_arguments(train_config: dict[str, Any], source: str = "checkpoint") -> dict[str, Any]:
    """The ``DiT`` arguments a minidit training config fixes beyond the weights' shapes (heads, label
    dropout, learned variance, classes), after checking the fields that sampling relies on."""
    model, p = train_config.get("model"), train_config.get("class_dropout_prob")
    schedule, steps = train_config.get("noise_schedule"), train_config.get("diffusion_steps")
    if model not in MODELS:
        raise CheckpointError(f"{source}: its config names an unknown model {model!r}")
    if isinstance(p, bool) or not isinstance(p, int | float) or not 0 <= p < 1:
        raise CheckpointError(f"{source}: its config has class_dropout_prob {p!r}, not a number in [0, 1)")
    if schedule not in CHOICES["noise_schedule"]:
        raise CheckpointError(f"{source}: its config has noise_schedule {schedule!r}, not one of linear, cosine")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps <= 0:
        raise CheckpointError(f"{source}: its config has diffusion_steps {steps!r}, not a positive integer")
    out = {"num_heads": MODELS[model][2], "class_dropout_prob": float(p)}
    out["learn_sigma"] = bool(train_config.get("learn_sigma", True))
    if isinstance(train_config.get("num_classes"), int):
        out["num_classes"] = train_config["num_classes"]
    return out


def infer_config(
    sd: dict[str, torch.Tensor],
    num_classes: int | None = None,
    class_dropout_prob: float | None = None,
    source: str = "state dict",
) -> dict[str, Any]:
    """Rebuild ``DiT(**config)`` arguments from a reference-layout state dict's shapes.

    The head count is not in the shapes: it is taken from the paper's model sizes
    (``MODELS``) by (depth, hidden size), and is missing from the result otherwise.
    Nor is the null class: the label table has ``num_classes + 1`` rows when the model was
    trained with label dropout (``class_dropout_prob > 0``; the last row is the null label that
    classifier-free guidance needs) and ``num_classes`` rows without. Pass what the checkpoint
    records (``num_classes`` or ``class_dropout_prob``); with neither, a null row and the
    reference's 0.1 are assumed, and a one-line ``CheckpointWarning`` says so.
    """
    try:
        D, C, p, _ = sd["x_embedder.proj.weight"].shape
        depth = _depth(sd, "blocks")
        T = sd["pos_embed"].shape[1]
        rows = sd["y_embedder.embedding_table.weight"].shape[0]
        out_dim = sd["final_layer.linear.weight"].shape[0]
        hidden_mlp = sd["blocks.0.mlp.fc1.weight"].shape[0]
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{source}: not a DiT state dict (missing {e})") from None
    if class_dropout_prob is not None:
        null = int(class_dropout_prob > 0)
    elif num_classes is not None:
        null = rows - num_classes
        class_dropout_prob = 0.1 if null else 0.0
    else:
        null, class_dropout_prob = 1, 0.1
        warnings.warn(
            f"{source}: no config stored with it: assuming {rows - 1} classes plus a null class "
            "(class_dropout_prob 0.1, as the reference)",
            CheckpointWarning,
            stacklevel=2,
        )
    if null not in (0, 1) or (num_classes is not None and rows - null != num_classes):
        raise CheckpointError(
            f"{source}: its label table has {rows} rows, which does not fit {num_classes} classes with "
            f"class_dropout_prob {class_dropout_prob}"
        )
    config: dict[str, Any] = dict(
        input_size=int(round(T**0.5)) * p, patch_size=p, in_channels=C, hidden_size=D, depth=depth,
        mlp_ratio=hidden_mlp / D, num_classes=rows - null, class_dropout_prob=class_dropout_prob,
        learn_sigma=out_dim == p * p * 2 * C,
    )  # fmt: skip
    for d, h, heads, _ in MODELS.values():
        if (d, h) == (depth, D):
            config["num_heads"] = heads
    return config


def model_name(config: dict[str, Any]) -> str | None:
    """The zoo name ("DiT-XL/2") of a config, if it is one in ``MODELS``."""
    for name, (d, h, heads, p) in MODELS.items():
        got = (config.get("depth"), config.get("hidden_size"), config.get("num_heads", heads), config.get("patch_size"))
        if got == (d, h, heads, p):
            return name
    return None


def describe_mismatch(model: torch.nn.Module, sd: dict[str, torch.Tensor], limit: int = 4) -> str:
    """One line naming the keys and shapes by which ``sd`` does not fit ``model`` ('' if it fits)."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [
        f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in own if k in sd and sd[k].shape != own[k].shape
    ]
    parts = []
    for label, items in (
        ("shape mismatch (checkpoint vs model)", shapes),
        ("missing", missing),
        ("unexpected", unexpected),
    ):
        if items:
            more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
            parts.append(f"{label}: {', '.join(items[:limit])}{more}")
    return "; ".join(parts)


def check_finite(sd: dict[str, torch.Tensor], source: str = "state dict") -> None:
    """Refuse weights that hold NaN or inf (a diverged run or a damaged file): they can only give blank samples."""
    bad = [k for k, v in sd.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        more = f" (+{len(bad) - 1} more)" if len(bad) > 1 else ""
        raise CheckpointError(f"{source}: its weights hold NaN/inf ({bad[0]}{more}): a diverged run or a damaged file")


def load_checkpoint(model: DiT, path_or_name: str | os.PathLike, prefer_ema: bool = True) -> DiT:
    """Load weights into ``model`` strictly; a checkpoint of another architecture raises
    ``CheckpointError`` naming the mismatching keys and shapes."""
    sd = load_state_dict(path_or_name, prefer_ema=prefer_ema, input_size=model.input_size)
    problem = describe_mismatch(model, sd)
    if problem:
        raise CheckpointError(f"{path_or_name}: does not fit this model: {problem}")
    model.load_state_dict(sd, strict=True)
    return model


def model_from_state_dict(sd: dict[str, torch.Tensor], source: str = "state dict", **overrides) -> DiT:
    """Build the DiT that a reference-layout state dict describes and load it strictly (eval mode).

    ``overrides`` are ``DiT`` arguments; ``num_classes`` / ``class_dropout_prob`` also say how to read
    the label table (see ``infer_config``). Weights holding NaN/inf are refused."""
    known = {k: overrides.get(k) for k in ("num_classes", "class_dropout_prob")}
    config = {**infer_config(sd, **known, source=source), **overrides}
    if "num_heads" not in config:
        raise CheckpointError(f"{source}: cannot tell the number of heads; pass num_heads=")
    model = DiT(**config)
    problem = describe_mismatch(model, sd)
    if problem:
        raise CheckpointError(f"{source}: does not fit the inferred model: {problem}")
    check_finite(sd, source)
    model.load_state_dict(sd, strict=True)
    return model.eval()


def model_from_checkpoint(path_or_name: str | os.PathLike, prefer_ema: bool = True, **overrides) -> DiT:
    """Build the DiT a checkpoint describes and load it (eval mode): from the run's own config for
    minidit checkpoints and run directories, from the shapes (and whatever else is stored) otherwise."""
    sd, meta = read_checkpoint(path_or_name, prefer_ema=prefer_ema, input_size=overrides.get("input_size"))
    return model_from_state_dict(sd, str(path_or_name), **{**meta["dit"], **overrides})


# --------------------------------------------------------------------------
# Released weights
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Pretrained:
    url: str
    model: str  # zoo name
    input_size: int  # latent side
    sha256: str | None = None  # None: no published hash; the download is checked by size and by a strict load


_BASE = "https://dl.fbaipublicfiles.com/DiT/models/"
PRETRAINED: dict[str, Pretrained] = {
    "DiT-XL-2-256x256.pt": Pretrained(_BASE + "DiT-XL-2-256x256.pt", "DiT-XL/2", 32),
    "DiT-XL-2-512x512.pt": Pretrained(_BASE + "DiT-XL-2-512x512.pt", "DiT-XL/2", 64),
}


def default_root() -> Path:
    """Where downloads go: ``$MINIDIT_HOME`` or ``pretrained_models/`` in the working directory."""
    return Path(os.environ.get("MINIDIT_HOME", "pretrained_models"))


def download(
    name: str,
    root: str | os.PathLike | None = None,
    url: str | None = None,
    sha256: str | None = None,
    progress: bool = True,
    timeout: float = 60.0,
) -> Path:
    """Fetch a released checkpoint (``"DiT-XL-2-256x256.pt"`` or ``"DiT-XL-2-512x512.pt"``) once.

    Streams to a temporary file with a progress bar, checks the byte count against
    the server's Content-Length and the SHA-256 when one is known (or passed), then
    checks that the file loads strictly into the DiT it belongs to, and only then
    renames it into place. Returns the local path. ``url`` overrides the source (mirrors, tests).
    """
    if name not in PRETRAINED and url is None:
        raise CheckpointError(f"unknown checkpoint {name!r}; released ones are {sorted(PRETRAINED)}")
    entry = PRETRAINED.get(name)
    url = url or entry.url
    sha256 = sha256 or (entry.sha256 if entry else None)
    dest = Path(root) if root is not None else default_root()
    path = dest / name
    if path.is_file():
        return path
    dest.mkdir(parents=True, exist_ok=True)

    def fetch(tmp: str) -> None:
        try:
            response = urllib.request.urlopen(url, timeout=timeout)
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise CheckpointError(
                f"cannot download {name} from {url}: {reason}. Without internet, copy the file to {path} by hand."
            ) from None
        with response:
            total = response.headers.get("Content-Length")
            total = int(total) if total is not None else None
            digest, received = hashlib.sha256(), 0
            bar = None
            if progress:
                from tqdm.auto import tqdm

                bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=name)
            try:
                with open(tmp, "wb") as f:
                    while True:
                        try:
                            chunk = response.read(1 << 20)
                        except (OSError, ValueError, http.client.HTTPException) as e:  # reset, incomplete read
                            raise CheckpointError(f"download of {name} broke off after {received} bytes: {e}") from None
                        if not chunk:
                            break
                        f.write(chunk)
                        digest.update(chunk)
                        received += len(chunk)
                        if bar is not None:
                            bar.update(len(chunk))
            finally:
                if bar is not None:
                    bar.close()
        if total is not None and received != total:
            raise CheckpointError(f"download of {name} is truncated: got {received} of {total} bytes; run it again")
        if sha256 is not None and digest.hexdigest() != sha256.lower():
            raise CheckpointError(f"download of {name} is corrupt: SHA-256 {digest.hexdigest()} != expected {sha256}")
        if entry is not None:  # the strongest check without a published hash: it loads strictly
            sd = extract_state_dict(read_file(tmp, kind="safetensors" if name.endswith(".safetensors") else "torch"))
            with torch.device("meta"):
                ref = create_model(entry.model, input_size=entry.input_size)
            problem = describe_mismatch(ref, sd)
            if problem:
                raise CheckpointError(f"download of {name} is not the expected {entry.model}: {problem}")

    atomic_write(path, fetch)
    return path
