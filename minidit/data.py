"""Real data for training: image folders, CIFAR-10, and pre-extracted VAE latents.

Every dataset here is map-style and deterministic (no random crops or flips inside:
the trainer samples, shuffles and flips itself). Items are ``(x, y)``:

- ``x``: a float32 tensor, either pixels in [-1, 1] of shape ``[3, S, S]`` or a latent
  ``[4, h, w]`` (``[2, 4, h, w]`` when the latent of the flipped image is stored too);
- ``y``: an int label.

and each dataset has the attributes the trainer reads:

- ``num_classes: int``, ``class_names: list[str]``;
- ``in_channels: int`` (3 for pixels, 4 for latents), ``input_size: int`` (the spatial side of ``x``);
- ``flip_mode: str``: ``"pixels"`` (the trainer flips ``x`` horizontally itself), ``"stored"``
  (``x`` is ``[2, C, h, w]``: the latent of the image and of its mirror image; the trainer
  picks one) or ``"none"``.

Pixels are scaled exactly as the reference's ``ToTensor()`` + ``Normalize(0.5, 0.5)``
(``(v / 255 - 0.5) / 0.5`` in float32), so the same image gives bit-identical inputs.
Problems with the data raise :class:`~minidit.errors.DataError` with one line that names
the path and says what to do.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import socket
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .errors import DataError, UserError

#: File extensions counted as images (torchvision's ``ImageFolder`` list), compared case-insensitively.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

#: The ``meta.json`` format written by ``minidit.extract_latents`` and read by :class:`LatentShards`.
LATENTS_FORMAT = "minidit-latents"
LATENTS_VERSION = 1


class UnreadableImageWarning(UserWarning):
    """An image file that could not be decoded and was replaced by the next readable one."""


def to_signed(arr: np.ndarray) -> torch.Tensor:
    """uint8 pixels ``[H, W, 3]`` -> float32 tensor ``[3, H, W]`` in [-1, 1].

    The same float32 operations as torchvision's ``ToTensor()`` then ``Normalize(0.5, 0.5)``
    (the reference's transform), so the result is bit-identical to it.
    """
    x = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).contiguous()
    return x.float().div(255).sub(0.5).div(0.5)


# --------------------------------------------------------------------------
# Image folders
# --------------------------------------------------------------------------


def center_crop_arr(pil_image: Image.Image, image_size: int) -> np.ndarray:
    """The ADM centre crop (guided-diffusion, used by DiT): uint8 ``[S, S, 3]`` with ``S = image_size``.

    1. While the short side is at least ``2 S``, halve both sides with a BOX filter
       (cheap, alias-free downsampling of big photos);
    2. resize with BICUBIC so that the short side is exactly ``S`` (sides rounded);
    3. cut the central ``S x S`` square (the extra pixel of an odd margin goes to the
       bottom/right).

    The image is converted to RGB first, so greyscale, palette and RGBA inputs work.
    """
    if image_size <= 0:
        raise UserError(f"image size must be positive, got {image_size}")
    image = pil_image.convert("RGB")
    while min(image.size) >= 2 * image_size:
        image = image.resize((image.width // 2, image.height // 2), resample=Image.BOX)
    scale = image_size / min(image.size)
    image = image.resize((round(image.width * scale), round(image.height * scale)), resample=Image.BICUBIC)
    arr = np.asarray(image)
    top = (arr.shape[0] - image_size) // 2
    left = (arr.shape[1] - image_size) // 2
    return arr[top : top + image_size, left : left + image_size].copy()  # a writable, contiguous copy


def _reason(error: BaseException) -> str:
    """``"TypeName: message"`` on one line."""
    message = " ".join(str(error).split())
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


def _has_image_extension(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)


def _find_images(folder: str) -> list[str]:
    """All image files under ``folder`` (recursively, following links), in ImageFolder's order."""
    found = []
    for dirpath, _, filenames in sorted(os.walk(folder, followlinks=True)):
        for name in sorted(filenames):
            if _has_image_extension(name):
                found.append(os.path.join(dirpath, name))
    return found


class ImageFolderDataset(Dataset):
    """Images in one subfolder per class, ADM centre-cropped to ``[3, S, S]`` in [-1, 1].

    Labels follow torchvision's ``ImageFolder``: class folders sorted by name give labels
    0, 1, ...; each holds image files (``IMG_EXTENSIONS``, any case) at any depth, in sorted
    order. Hidden folders (names starting with ".", e.g. ``.ipynb_checkpoints``) are not
    classes. ``flip_mode = "pixels"``: the trainer does the horizontal flips.

    Unreadable images (truncated, corrupt, not really images): a run never stops for one.
    Item ``i`` whose file cannot be decoded is replaced by the next readable file
    (``i + 1``, ``i + 2``, ..., wrapping around), with that file's label: the same
    substitute every time, so runs stay deterministic. Each bad path is recorded in
    ``bad_files`` (path -> reason; per process, so DataLoader workers keep their own) and
    warned about once, with an :class:`UnreadableImageWarning` that counts the bad files
    seen so far. Only if *no* file can be read is it an error (``DataError``). To find bad
    files before a run, call :meth:`verify`, which decodes every file with a progress bar
    and returns the bad ones.

    Raises ``DataError`` (one line) if ``root`` is missing, is not a directory, has no
    class subfolders, or holds no image files.
    """

    in_channels = 3
    flip_mode = "pixels"

    def __init__(self, root: str | os.PathLike, image_size: int):
        root_path = Path(root).expanduser()
        if not root_path.exists():
            raise DataError(f"{root}: no such directory; pass the path of an image folder with one subfolder per class")
        if not root_path.is_dir():
            raise DataError(f"{root}: is a file, not a directory; pass an image folder with one subfolder per class")
        if int(image_size) <= 0:
            raise UserError(f"image size must be positive, got {image_size}")
        classes = sorted(e.name for e in os.scandir(root_path) if e.is_dir() and not e.name.startswith("."))
        if not classes:
            loose = [e.name for e in os.scandir(root_path) if e.is_file() and _has_image_extension(e.name)]
            hint = f" (it holds {len(loose)} images directly: move them into class subfolders)" if loose else ""
            raise DataError(
                f"{root}: no class subfolders{hint}; lay it out as {root}/<class>/<image> "
                "(one subfolder, for unconditional data)"
            )
        samples: list[tuple[str, int]] = []
        empty = []
        for label, name in enumerate(classes):
            files = _find_images(str(root_path / name))
            if not files:
                empty.append(name)
            samples.extend((path, label) for path in files)
        if not samples:
            raise DataError(
                f"{root}: no image files ({', '.join(IMG_EXTENSIONS)}) in its {len(classes)} class folders; "
                "put the images in the class subfolders"
            )
        if empty:
            shown = ", ".join(empty[:5]) + (f" (+{len(empty) - 5} more)" if len(empty) > 5 else "")
            warnings.warn(f"{root}: {len(empty)} class folders hold no images: {shown}", stacklevel=2)
        self.root = str(root_path)
        self.image_size = int(image_size)
        self.input_size = int(image_size)
        self.class_names: list[str] = classes
        self.num_classes = len(classes)
        self.samples = samples
        self.targets = [label for _, label in samples]
        self.bad_files: dict[str, str] = {}

    def __len__(self) -> int:
        return len(self.samples)

    def _decode(self, path: str) -> np.ndarray:
        """``[S, S, 3]`` uint8, or an exception if the file cannot be decoded."""
        with Image.open(path) as image:
            image.load()  # decode now, inside the caller's try: PIL is lazy
            return center_crop_arr(image, self.image_size)

    def load(self, index: int) -> tuple[torch.Tensor, int, int]:
        """``(x [3, S, S] in [-1, 1], label, source index)``: the source index is ``index`` itself,
        or that of the readable file substituted for an unreadable one."""
        n = len(self.samples)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} images")
        index %= n
        for step in range(n):
            source = (index + step) % n
            path, label = self.samples[source]
            if path in self.bad_files:
                continue
            try:
                arr = self._decode(path)
            except Exception as e:  # PIL raises many types for damaged files: OSError, SyntaxError, ValueError, ...
                self._record_bad(path, e)
                continue
            return to_signed(arr), label, source
        example = next(iter(self.bad_files.items()))
        raise DataError(
            f"{self.root}: none of its {n} image files can be read (e.g. {example[0]}: {example[1]}); "
            "check the files or the path"
        )

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        """``(x, y)``: ``x`` float32 ``[3, S, S]`` in [-1, 1], ``y`` the class label."""
        x, y, _ = self.load(index)
        return x, y

    def _record_bad(self, path: str, error: BaseException) -> None:
        reason = _reason(error)
        self.bad_files[path] = reason
        warnings.warn(
            f"{path}: unreadable image, skipped ({reason}); the next readable image is used in its place "
            f"({len(self.bad_files)} unreadable files so far)",
            UnreadableImageWarning,
            stacklevel=3,
        )

    def verify(self, progress: bool = True) -> list[tuple[str, str]]:
        """Decode every file once (with a tqdm bar); returns ``[(path, reason)]`` of the unreadable ones,
        which are also recorded in ``bad_files`` (without warnings). Raises ``DataError`` if none is readable."""
        from tqdm.auto import tqdm

        bad = []
        for path, _ in tqdm(self.samples, desc="verifying images", unit="img", disable=not progress):
            try:
                self._decode(path)
            except Exception as e:  # see load()
                self.bad_files[path] = _reason(e)
                bad.append((path, _reason(e)))
        if len(bad) == len(self.samples):
            raise DataError(
                f"{self.root}: none of its {len(bad)} image files can be read (e.g. {bad[0][0]}: {bad[0][1]})"
            )
        return bad

    def files_digest(self) -> str:
        """SHA-256 of the sorted (relative path, label) list: identifies the file list, not the pixels."""
        h = hashlib.sha256()
        for path, label in self.samples:
            h.update(f"{os.path.relpath(path, self.root)}\t{label}\n".encode())
        return h.hexdigest()


# --------------------------------------------------------------------------
# CIFAR-10
# --------------------------------------------------------------------------


def _local_cifar10_class():
    """torchvision's CIFAR10 that trusts an already-extracted local copy.

    torchvision checks the MD5 of every extracted batch file (and of ``batches.meta``) on
    each load and refuses anything else. Here, when all the files are present, they are
    accepted as they are (a damaged file then fails to unpickle, which ``cifar10`` reports
    as a ``DataError``): so a hand-copied or test copy loads, and nothing touches the
    network. When files are missing, torchvision's own download runs unchanged, archive
    MD5 check included.
    """
    from torchvision.datasets import CIFAR10

    class LocalCIFAR10(CIFAR10):
        meta = {**CIFAR10.meta, "md5": None}  # batches.meta: checked for presence only

        def _check_integrity(self) -> bool:
            folder = os.path.join(self.root, self.base_folder)
            return all(os.path.isfile(os.path.join(folder, name)) for name, _ in self.train_list + self.test_list)

    return LocalCIFAR10


@contextmanager
def _socket_timeout(seconds: float):
    """torchvision opens URLs without a timeout; give them one so a dead network fails instead of hanging."""
    old = socket.getdefaulttimeout()
    if old is None:
        socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(old)


class CIFAR10Dataset(Dataset):
    """CIFAR-10 as ``(x [3, 32, 32] in [-1, 1], y)``; ``flip_mode = "pixels"``.

    Wraps a torchvision ``CIFAR10`` (its uint8 array ``data [N, 32, 32, 3]`` and ``targets``);
    class names come from the dataset's ``batches.meta``.
    """

    in_channels = 3
    input_size = 32
    flip_mode = "pixels"

    def __init__(self, base: Any):
        self.base = base
        self.data: np.ndarray = base.data
        self.targets: list[int] = list(base.targets)
        self.class_names: list[str] = list(base.classes)
        self.num_classes = len(self.class_names)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return to_signed(self.data[index]), int(self.targets[index])


def cifar10(root: str | os.PathLike = "data/cifar10", train: bool = True, download: bool = True) -> CIFAR10Dataset:
    """CIFAR-10 (train or test split) from ``root/cifar-10-batches-py/``, downloaded there if missing.

    An extracted copy already in place is used as it is, without MD5 checks and without
    any network access. A failed download (offline, ...) or a damaged copy raises
    ``DataError`` with one line saying what to do.
    """
    root = Path(root).expanduser()
    folder = root / "cifar-10-batches-py"
    if root.exists() and not root.is_dir():
        raise DataError(f"{root}: is a file; CIFAR-10 needs a directory (it is kept in {folder})")
    LocalCIFAR10 = _local_cifar10_class()
    names = [name for name, _ in LocalCIFAR10.train_list + LocalCIFAR10.test_list] + [LocalCIFAR10.meta["filename"]]
    present = all((folder / name).is_file() for name in names)
    if not present and not download:
        raise DataError(f"{folder}: CIFAR-10 not found; pass download=True, or put cifar-10-batches-py/ there by hand")
    try:
        with _socket_timeout(60):
            base = LocalCIFAR10(str(root), train=train, download=download and not present)
    except Exception as e:  # torchvision and urllib raise URLError, OSError, RuntimeError, TarError, pickle errors, ...
        reason = " ".join(str(getattr(e, "reason", None) or e).split()) or type(e).__name__
        if present:
            raise DataError(
                f"{folder}: damaged CIFAR-10 files ({type(e).__name__}: {reason}); delete the folder and download again"
            ) from None
        raise DataError(
            f"cannot download CIFAR-10 to {root}: {reason}; without internet, put cifar-10-batches-py/ there by hand"
        ) from None
    if base.data.ndim != 4 or base.data.shape[1:] != (32, 32, 3) or len(base.data) != len(base.targets):
        raise DataError(f"{folder}: not CIFAR-10 data (images of shape {base.data.shape[1:]}); download it again")
    return CIFAR10Dataset(base)


# --------------------------------------------------------------------------
# Pre-extracted VAE latents
# --------------------------------------------------------------------------


def shard_name(index: int) -> str:
    """The file name of shard ``index``: ``shard_00000.safetensors``."""
    return f"shard_{index:05d}.safetensors"


def read_latents_meta(root: str | os.PathLike) -> dict[str, Any]:
    """The ``meta.json`` of a latents directory, or ``DataError``."""
    path = Path(root) / "meta.json"
    if not Path(root).is_dir():
        raise DataError(f"{root}: no such directory; extract latents there with python -m minidit.extract_latents")
    if not path.is_file():
        raise DataError(
            f"{path}: missing, so {root} is not a latents directory; "
            "write one with python -m minidit.extract_latents --out " + str(root)
        )
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: not readable JSON ({e}); rerun python -m minidit.extract_latents") from None
    if not isinstance(meta, dict) or meta.get("format") != LATENTS_FORMAT:
        raise DataError(f"{path}: not a minidit latents meta.json (format != {LATENTS_FORMAT!r})")
    if meta.get("version") != LATENTS_VERSION:
        raise DataError(
            f"{path}: latents format version {meta.get('version')}, this minidit reads {LATENTS_VERSION}; "
            "extract them again"
        )
    return meta


class LatentShards(Dataset):
    """VAE latents written by ``python -m minidit.extract_latents``: ``meta.json`` + ``shard_NNNNN.safetensors``.

    Item ``i`` lives in shard ``i // shard_size`` at row ``i % shard_size``. Items are
    ``(x, y)`` with ``x`` float32 ``[4, h, w]`` (already multiplied by the VAE scale
    0.18215), or ``[2, 4, h, w]`` = (latent of the image, latent of its mirror image)
    when the extraction stored flips (``flip_mode = "stored"``; otherwise ``"none"``).

    Shards are opened lazily with safetensors' ``safe_open`` (memory-mapped: a row read
    touches only its bytes) and the handles are cached per process, so each DataLoader
    worker opens its own. Labels (``targets``, int64 ``[N]``) are read at construction,
    which also checks that every shard is present and complete: an interrupted
    extraction raises ``DataError`` saying to rerun ``extract_latents`` to finish it.
    """

    def __init__(self, root: str | os.PathLike):
        from safetensors import SafetensorError, safe_open

        self.root = str(root)
        meta = read_latents_meta(root)
        self.meta = meta
        finish = f"rerun python -m minidit.extract_latents with the same arguments to finish it (--out {root})"
        if not meta.get("complete", False):
            raise DataError(f"{root}: incomplete latents extraction; {finish}")
        self.num_images = int(meta["num_images"])
        self.shard_size = int(meta["shard_size"])
        self.flip = bool(meta["flip"])
        self.latent_shape = tuple(int(s) for s in meta["latent_shape"])
        self.class_names: list[str] = list(meta["class_names"])
        self.num_classes = len(self.class_names)
        self.in_channels = self.latent_shape[0]
        self.input_size = self.latent_shape[1]
        self.image_size = int(meta["image_size"])
        self.scale = float(meta["scale"])
        self.flip_mode = "stored" if self.flip else "none"
        num_shards = math.ceil(self.num_images / self.shard_size)
        labels = []
        for s in range(num_shards):
            path = os.path.join(self.root, shard_name(s))
            expected = min(self.shard_size, self.num_images - s * self.shard_size)
            if not os.path.isfile(path):
                raise DataError(f"{root}: {shard_name(s)} is missing ({num_shards} shards expected); {finish}")
            try:
                with safe_open(path, framework="pt") as f:
                    shape = f.get_slice("latents").get_shape()
                    shard_labels = f.get_tensor("labels")
                    has_flip = "latents_flip" in f.keys()
            except (SafetensorError, OSError, KeyError, ValueError) as e:
                raise DataError(f"{path}: unreadable shard ({e}); delete it and {finish}") from None
            if tuple(shape) != (expected, *self.latent_shape) or len(shard_labels) != expected or has_flip != self.flip:
                raise DataError(
                    f"{path}: holds {shape[0]} latents of shape {tuple(shape[1:])}, expected {expected} of "
                    f"{self.latent_shape}{' with flips' if self.flip else ''}; delete it and {finish}"
                )
            labels.append(shard_labels.long())
        self.targets = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long)
        if len(self.targets) != self.num_images:
            raise DataError(f"{root}: {len(self.targets)} latents, meta.json says {self.num_images}; {finish}")
        self._handles: dict[int, Any] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return self.num_images

    def __getstate__(self) -> dict[str, Any]:  # open shard handles do not travel to worker processes
        state = self.__dict__.copy()
        state["_handles"] = {}
        return state

    def _shard(self, s: int) -> Any:
        from safetensors import safe_open

        if os.getpid() != self._pid:  # a forked worker: open its own handles
            self._handles, self._pid = {}, os.getpid()
        handle = self._handles.get(s)
        if handle is None:
            handle = safe_open(os.path.join(self.root, shard_name(s)), framework="pt")
            self._handles[s] = handle
        return handle

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        """``(x, y)``: ``x`` float32 ``[4, h, w]``, or ``[2, 4, h, w]`` (image, flipped image) with stored flips."""
        n = self.num_images
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} latents")
        index %= n
        s, row = divmod(index, self.shard_size)
        f = self._shard(s)
        x = f.get_slice("latents")[row]
        if self.flip:
            x = torch.stack([x, f.get_slice("latents_flip")[row]])
        return x.float(), int(self.targets[index])


# --------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------

DATASET_KINDS = ("cifar10", "folder", "latents")


def build_dataset(kind: str, data_path: str | None, image_size: int, root: str = "data") -> Dataset:
    """The training dataset for ``--data KIND``.

    - ``"cifar10"``: CIFAR-10 train split in ``data_path`` (default ``root/cifar10``), downloaded if
      missing; ``image_size`` must be 32.
    - ``"folder"``: :class:`ImageFolderDataset` at ``data_path`` (required), centre-cropped to ``image_size``.
    - ``"latents"``: :class:`LatentShards` at ``data_path`` (required); ``image_size`` must be the
      pixel size the latents were extracted at, or their latent side (e.g. 256 or 32); None skips the check.
    """
    if kind == "cifar10":
        if image_size != 32:
            raise UserError(f"CIFAR-10 images are 32x32: use image size 32, not {image_size}")
        return cifar10(root=data_path or os.path.join(root, "cifar10"), train=True, download=True)
    if kind == "folder":
        if not data_path:
            raise UserError("data 'folder' needs a data path: the image folder, with one subfolder per class")
        return ImageFolderDataset(data_path, image_size)
    if kind == "latents":
        if not data_path:
            raise UserError(
                "data 'latents' needs a data path: a directory written by python -m minidit.extract_latents"
            )
        dataset = LatentShards(data_path)
        if image_size is not None and image_size not in (dataset.image_size, dataset.input_size):
            raise UserError(
                f"{data_path}: latents extracted from {dataset.image_size}px images ({dataset.input_size}x"
                f"{dataset.input_size} latents), but image size {image_size} was asked for"
            )
        return dataset
    raise UserError(f"unknown dataset kind {kind!r}; choose one of {', '.join(DATASET_KINDS)}")
