"""Real data for training: image folders, CIFAR-10, and pre-extracted VAE latents.

Every dataset here is map-style and deterministic (no random crops or flips inside:
the trainer samples, shuffles and flips itself). Items are ``(x, y)``:

- ``x``: a float32 tensor, either pixels in [-1, 1] of shape ``[3, S, S]`` or a latent
  ``[4, h, w]`` (``[2, 4, h, w]`` when the latent of the flipped image is stored too;
  ``[2, 2, 4, h, w]`` for posterior moments: see :class:`LatentShards` and :func:`latent_x0`);
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
import importlib
import json
import math
import os
import pickle
import socket
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import Dataset

from .errors import DataError, UserError

if TYPE_CHECKING:
    from PIL import Image

#: File extensions counted as images (torchvision's ``ImageFolder`` list), compared case-insensitively.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

#: The ``meta.json`` format written by ``minidit.extract_latents`` and read by :class:`LatentShards`.
LATENTS_FORMAT = "minidit-latents"
#: Version 2 adds posterior moments (``posterior: "moments"``); frozen extractions are still written as
#: version 1, the format of every extraction made before, so both are read.
LATENTS_VERSION = 2
LATENTS_VERSIONS = (1, 2)


class UnreadableImageWarning(UserWarning):
    """An image file that could not be decoded and was replaced by the next readable one."""


class SkippedLinkWarning(UserWarning):
    """Folder links inside class folders that were not followed (they can loop, or mix classes)."""


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

    The image is converted to RGB first (:func:`to_rgb`), so greyscale, 16-bit, palette and RGBA inputs work.
    """
    from PIL import Image  # here, not at the top: the toy and latent paths (and the GPU bench) need no Pillow

    if image_size <= 0:
        raise UserError(f"image size must be positive, got {image_size}")
    image = to_rgb(pil_image)
    while min(image.size) >= 2 * image_size:
        image = image.resize((image.width // 2, image.height // 2), resample=Image.BOX)
    scale = image_size / min(image.size)
    image = image.resize((round(image.width * scale), round(image.height * scale)), resample=Image.BICUBIC)
    arr = np.asarray(image)
    top = (arr.shape[0] - image_size) // 2
    left = (arr.shape[1] - image_size) // 2
    return arr[top : top + image_size, left : left + image_size].copy()  # a writable, contiguous copy


def to_rgb(image: Image.Image) -> Image.Image:
    """``image`` as 8-bit RGB. 16-bit greyscale (PIL modes ``I;16*``, and ``I`` as PIL opens 16-bit PNGs) is
    scaled from 0..65535 to 0..255: PIL's own ``convert`` clips it at 255, so most such images would come
    out pure white. (16-bit RGB PNGs PIL already reads as 8-bit RGB.) Float images (mode ``F``) are refused
    with a ``ValueError``: their range is unknown."""
    from PIL import Image

    if image.mode.startswith("I;16") or image.mode == "I":
        wide = np.asarray(image).astype(np.int64).clip(0, 65535)
        image = Image.fromarray(((wide + 128) // 257).astype(np.uint8), mode="L")  # round(v / 257)
    elif image.mode == "F":
        raise ValueError("a 32-bit float image: its range is unknown; save it as an 8- or 16-bit image")
    return image.convert("RGB")


def _reason(error: BaseException) -> str:
    """``"TypeName: message"`` on one line."""
    message = " ".join(str(error).split())
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


def _has_image_extension(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)


def _find_images(folder: str) -> tuple[list[str], int]:
    """All image files under the class folder ``folder`` (at any depth, in ImageFolder's order), and the
    number of folder links met inside it, which are not followed: a link leading out of the class folder or
    back into the tree can loop forever or file another class's images under this one. Links to image
    files are read."""
    found, links = [], 0
    for dirpath, dirnames, filenames in sorted(os.walk(folder)):  # followlinks=False
        links += sum(os.path.islink(os.path.join(dirpath, d)) for d in dirnames)
        for name in sorted(filenames):
            if _has_image_extension(name):
                found.append(os.path.join(dirpath, name))
    return found, links


def _overlapping_classes(root: Path, classes: list[str]) -> str | None:
    """A description of two class folders (or a class folder and the root) that are the same folder or one
    inside the other through links, or None. Class folders may be links, but never to each other."""
    top = Path(os.path.realpath(root)).parts
    real = sorted((Path(os.path.realpath(root / name)).parts, name) for name in classes)  # a folder, then its insides
    for (outer, a), (inner, b) in zip(real, real[1:]):
        if inner[: len(outer)] == outer:
            return f"class folder {b} is {'the same folder as' if inner == outer else 'inside'} {a} ({Path(*inner)})"
    for parts, name in real:
        if top[: len(parts)] == parts:
            return f"class folder {name} links to the dataset folder itself"
    return None


class ImageFolderDataset(Dataset):
    """Images in one subfolder per class, ADM centre-cropped to ``[3, S, S]`` in [-1, 1].

    Labels follow torchvision's ``ImageFolder``: class folders sorted by name give labels
    0, 1, ...; each holds image files (``IMG_EXTENSIONS``, any case) at any depth, in sorted
    order. Hidden folders (names starting with ".", e.g. ``.ipynb_checkpoints``) are not
    classes. ``flip_mode = "pixels"``: the trainer does the horizontal flips.

    Links: a class folder may itself be a link (to a folder no other class folder shares);
    links to folders *inside* class folders are not followed (they can loop, or file another
    class's images under this one), with one :class:`SkippedLinkWarning` that counts them;
    links to image files are read. 16-bit greyscale images are scaled to 8 bits (:func:`to_rgb`).

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
        overlap = _overlapping_classes(root_path, classes)
        if overlap:
            raise DataError(f"{root}: {overlap}; each class needs its own folder of images")
        samples: list[tuple[str, int]] = []
        empty, links = [], 0
        for label, name in enumerate(classes):
            files, n_links = _find_images(str(root_path / name))
            links += n_links
            if not files:
                empty.append(name)
            samples.extend((path, label) for path in files)
        if links:
            warnings.warn(
                f"{root}: {links} folder links inside class folders not followed (a link can loop or mix classes); "
                "put the images themselves, or links to the image files, in the class folders",
                SkippedLinkWarning,
                stacklevel=2,
            )
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
        from PIL import Image

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
#
# torchvision does the downloading: URL, MD5s and layout come from ``torchvision.datasets.CIFAR10`` and its
# helper fetches, checks and extracts the archive. Written here is what it cannot do: read the files without
# running code (``CIFAR10(...)`` uses plain ``pickle.load``, which calls any global a tampered file names, and
# ``torch.load(weights_only=True)`` reads only ``torch.save`` files: "Invalid magic number" on these plain
# pickles), load a copy that is not the official release (``CIFAR10(...)`` refuses it: "Dataset not found or
# corrupted"; here it loads, with a warning), and fail in one ``DataError`` line instead of a traceback.


@contextmanager
def socket_timeout(seconds: float):
    """urllib (torchvision's and torch.hub's downloads) opens URLs without a timeout: give them one, so a dead
    network fails instead of hanging. A default timeout the caller has already set is kept."""
    old = socket.getdefaulttimeout()
    if old is None:
        socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(old)


class _NumpyUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays and plain containers only (what CIFAR-10's files hold), never code.

    CIFAR-10's batch files are dicts of a numpy array, lists, ints and strings; ``batches.meta`` a dict of
    a list of strings and ints. Those need no globals but numpy's array reconstruction (and
    ``_codecs.encode``, which Python 3 writes for bytes in protocol-2 pickles): any other global is refused
    before it is imported, with its name.
    """

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refused to load {module}.{name}: only numpy arrays are expected")
        if module.startswith("numpy.core.") and hasattr(np, "_core"):  # numpy 2 renamed numpy.core
            module = module.replace("numpy.core.", "numpy._core.", 1)
        elif module.startswith("numpy._core.") and not hasattr(np, "_core"):  # a numpy 2 pickle on numpy 1
            module = module.replace("numpy._core.", "numpy.core.", 1)
        return getattr(importlib.import_module(module), name)


def cifar10_files(root: str | os.PathLike = "data/cifar10", train: bool = True, download: bool = True) -> list[Path]:
    """The batch files of one CIFAR-10 split under ``root/cifar-10-batches-py/``, downloaded first if missing.

    Present means the split's batch files and ``batches.meta`` are there; they are not read or
    checked here. Otherwise, with ``download``, torchvision's download runs: the official archive
    (its URL and MD5 from ``torchvision.datasets.CIFAR10``) is fetched into ``root``, unless a
    verified ``cifar-10-python.tar.gz`` is there already, and extracted. Failures (no network,
    a bad archive, ...) raise ``DataError`` with one line.
    """
    from torchvision.datasets import CIFAR10

    root = Path(root).expanduser()
    folder = root / CIFAR10.base_folder
    if root.exists() and not root.is_dir():
        raise DataError(f"{root}: is a file; CIFAR-10 needs a directory (it is kept in {folder})")
    names = [name for name, _ in (CIFAR10.train_list if train else CIFAR10.test_list)]
    needed = [*names, CIFAR10.meta["filename"]]
    missing = [name for name in needed if not (folder / name).is_file()]
    if missing and not download:
        raise DataError(
            f"{folder}: CIFAR-10 not found (no {', '.join(missing)}); pass download=True, "
            "or put cifar-10-batches-py/ there by hand"
        )
    if missing:
        from torchvision.datasets import utils as tv_utils

        try:
            with socket_timeout(60):
                # What CIFAR10(root, download=True) runs, without its loading with plain pickle.load afterwards.
                tv_utils.download_and_extract_archive(
                    CIFAR10.url, str(root), filename=CIFAR10.filename, md5=CIFAR10.tgz_md5
                )
        except Exception as e:  # urllib and tarfile raise URLError, OSError, RuntimeError (md5), TarError, EOFError...
            reason = " ".join(str(getattr(e, "reason", None) or e).split()) or type(e).__name__
            raise DataError(
                f"cannot download CIFAR-10 to {root}: {reason}; without internet, put cifar-10-batches-py/ "
                f"(or {CIFAR10.filename}) there by hand"
            ) from None
        missing = [name for name in needed if not (folder / name).is_file()]
        if missing:
            archive = root / CIFAR10.filename
            raise DataError(f"{folder}: no {', '.join(missing)} after extracting {archive}; delete it and retry")
    return [folder / name for name in names]


def _damaged(path: Path, reason: str) -> DataError:
    return DataError(f"{path}: damaged CIFAR-10 file ({reason}); delete {path.parent} and download it again")


def _unpickle(path: Path) -> dict:
    """One CIFAR-10 file, read with ``_NumpyUnpickler`` -> its dict, or a one-line ``DataError``."""
    try:
        with open(path, "rb") as f:
            entry = _NumpyUnpickler(f, encoding="latin1").load()  # latin1: the files were pickled by Python 2
    except Exception as e:  # truncated or foreign files raise many types; none can run code here
        raise _damaged(path, _reason(e)) from None
    if not isinstance(entry, dict):
        raise _damaged(path, f"holds a {type(entry).__name__}, not a dict")
    return entry


def _read_batch(path: Path, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """One batch file -> (rows uint8 [n, 3072], labels int64 [n])."""
    entry = _unpickle(path)
    if "data" not in entry or "labels" not in entry:
        raise _damaged(path, f"no 'data' and 'labels' in it (keys: {', '.join(map(str, entry)) or 'none'})")
    data, labels = entry["data"], np.asarray(entry["labels"])
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        shape = f"{data.dtype} {list(data.shape)}" if isinstance(data, np.ndarray) else type(data).__name__
        raise _damaged(path, f"expected uint8 data [N, 3072], got {shape}")
    if labels.shape != (len(data),) or not np.issubdtype(labels.dtype, np.integer):
        raise _damaged(path, f"expected {len(data)} integer labels, got {labels.dtype} {list(labels.shape)}")
    if len(labels) and not (0 <= labels.min() and labels.max() < num_classes):
        raise _damaged(path, f"labels {labels.min()}..{labels.max()} outside 0..{num_classes - 1}")
    return data, labels.astype(np.int64)


def _read_class_names(path: Path) -> list[str]:
    """``batches.meta`` -> its ``label_names`` (strings; bytes are decoded)."""
    entry = _unpickle(path)
    names = entry.get("label_names")
    if not isinstance(names, list) or not names or not all(isinstance(n, str | bytes) for n in names):
        raise _damaged(path, "no list of class names under 'label_names'")
    return [n.decode("latin1") if isinstance(n, bytes) else n for n in names]


def load_cifar10_arrays(
    root: str | os.PathLike = "data/cifar10", train: bool = True, download: bool = True
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """One CIFAR-10 split -> (images uint8 [N, 32, 32, 3], labels int64 [N], class names).

    N is 50,000 for the train split (``data_batch_1..5``, in order) and 10,000 for the test split
    (``test_batch``); class names come from ``batches.meta``. The files are those of
    ``root/cifar-10-batches-py/`` (torchvision's layout), downloaded first if missing
    (:func:`cifar10_files`).

    The files are read with a restricted unpickler that builds numpy arrays and plain
    containers only: a file that names any other global (code) is refused before anything
    runs. An extracted copy is used as it is, without the network: a copy whose files differ
    from the official release's MD5s loads, with one warning. A damaged file (truncated, not
    CIFAR-10, refused) raises ``DataError`` with one line naming it.
    """
    from torchvision.datasets import CIFAR10
    from torchvision.datasets.utils import check_integrity

    files = cifar10_files(root, train, download)
    meta = files[0].parent / CIFAR10.meta["filename"]
    class_names = _read_class_names(meta)
    rows, labels = zip(*(_read_batch(f, len(class_names)) for f in files), strict=True)
    md5 = dict(CIFAR10.train_list + CIFAR10.test_list) | {meta.name: CIFAR10.meta["md5"]}  # the official files'
    differ = [f.name for f in [*files, meta] if not check_integrity(str(f), md5[f.name])]
    if differ:
        warnings.warn(
            f"{meta.parent}: {', '.join(differ)} differ from the official CIFAR-10 release (md5): "
            "results on these images (FIDs included) are not comparable with published numbers",
            stacklevel=2,
        )
    # Each row is 1024 red, then 1024 green, then 1024 blue values, row-major: [N, 3, 32, 32] -> [N, 32, 32, 3].
    images = np.concatenate(rows).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return images, np.concatenate(labels), class_names


class CIFAR10Dataset(Dataset):
    """CIFAR-10 as ``(x [3, 32, 32] in [-1, 1], y)``; ``flip_mode = "pixels"``.

    Holds the arrays of :func:`load_cifar10_arrays`: ``data`` uint8 ``[N, 32, 32, 3]``,
    ``targets`` (a list of N ints) and ``class_names``.
    """

    in_channels = 3
    input_size = 32
    flip_mode = "pixels"

    def __init__(self, data: np.ndarray, targets, class_names: list[str]):
        self.data: np.ndarray = data
        self.targets: list[int] = [int(t) for t in targets]
        self.class_names: list[str] = list(class_names)
        self.num_classes = len(self.class_names)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return to_signed(self.data[index]), self.targets[index]


def cifar10(root: str | os.PathLike = "data/cifar10", train: bool = True, download: bool = True) -> CIFAR10Dataset:
    """CIFAR-10 (train or test split) from ``root/cifar-10-batches-py/``, downloaded there if missing.

    See :func:`load_cifar10_arrays`: an extracted copy already in place is used as it is,
    without any network access (with a warning if it is not the official release), and
    read without running code. A failed download (offline, ...) or a damaged copy raises
    ``DataError`` with one line saying what to do.
    """
    return CIFAR10Dataset(*load_cifar10_arrays(root, train, download))


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
    if meta.get("version") not in LATENTS_VERSIONS:
        raise DataError(
            f"{path}: latents format version {meta.get('version')}, this minidit reads versions "
            f"{', '.join(map(str, LATENTS_VERSIONS))}; update minidit or extract them again"
        )
    if meta.get("posterior", "sample") not in POSTERIORS:
        raise DataError(f"{path}: unknown posterior {meta.get('posterior')!r} (not one of {', '.join(POSTERIORS)})")
    return meta


#: What an extraction stores per image: posterior moments (the default: the trainer samples them every
#: step), or one frozen latent: a posterior sample, or the posterior mean.
POSTERIORS = ("moments", "sample", "mean")


def shard_layout(meta: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """The latent tensors of every shard of an extraction and their per-image shapes (``labels [n]`` aside).

    - ``posterior: "moments"``: ``moments [n, 2, 2, C, h, w]``: axis 1 the image and its mirror image,
      axis 2 the posterior mean and std, *unscaled* (the trainer draws ``z = (mean + std * eps) * 0.18215``);
    - ``"sample"`` / ``"mean"`` (frozen): ``latents [n, C, h, w]`` (already scaled by 0.18215) and, with
      flips, ``latents_flip [n, C, h, w]`` (the latent of the mirror image).
    """
    shape = tuple(int(s) for s in meta["latent_shape"])
    if meta.get("posterior") == "moments":
        return {"moments": (2, 2, *shape)}
    return {"latents": shape, "latents_flip": shape} if meta["flip"] else {"latents": shape}


def latent_x0(x: torch.Tensor, flip: torch.Tensor, eps: torch.Tensor | None = None) -> torch.Tensor:
    """The latents ``x_0 [B, C, h, w]`` a step trains on, from a micro-batch of :class:`LatentShards` items.

    ``x``: ``[B, C, h, w]`` frozen latents (returned as they are); ``[B, 2, C, h, w]`` frozen latents of
    the image and its mirror image (``flip [B]`` bool picks the mirror); ``[B, 2, 2, C, h, w]`` posterior
    moments of both: after the flip choice, a fresh posterior sample ``z = (mean + std * eps) * 0.18215``
    with ``eps [B, C, h, w]`` standard normal. The trainer draws ``flip`` and ``eps`` per step and per
    position in the global batch, so they do not depend on the number of processes or the micro-batches.
    """
    from .vae import sample_posterior

    if x.ndim == 4:
        return x
    if x.ndim not in (5, 6) or x.shape[1] != 2:
        raise ValueError(f"latents of shape {tuple(x.shape)}: expected [B, C, h, w], [B, 2, ...] or [B, 2, 2, ...]")
    x = torch.where(flip.view(-1, *[1] * (x.ndim - 2)), x[:, 1], x[:, 0])
    if x.ndim == 4:
        return x
    if eps is None or eps.shape != x[:, 0].shape:
        raise ValueError(f"posterior moments need eps of shape {tuple(x[:, 0].shape)}")
    return sample_posterior(x[:, 0], x[:, 1], eps)


class LatentShards(Dataset):
    """VAE latents written by ``python -m minidit.extract_latents``: ``meta.json`` + ``shard_NNNNN.safetensors``.

    Item ``i`` lives in shard ``i // shard_size`` at row ``i % shard_size``. Items are ``(x, y)``,
    ``x`` float32, by what the extraction stored (``posterior`` in meta.json, :func:`shard_layout`):

    - ``"moments"`` (``moments = True``): ``[2, 2, 4, h, w]``, the posterior mean and std (unscaled)
      of the image and of its mirror image; the trainer draws a fresh sample and flip every step
      (:func:`latent_x0`), as the reference, which encodes every image at every step;
    - ``"sample"`` / ``"mean"`` (frozen): ``[4, h, w]`` (already multiplied by the VAE scale 0.18215),
      or ``[2, 4, h, w]`` = (latent of the image, latent of its mirror image) when the extraction
      stored flips.

    ``flip_mode`` is ``"stored"`` when the mirror image is stored (always with moments), else ``"none"``.

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
        self.posterior = meta.get("posterior", "sample")
        self.moments = self.posterior == "moments"
        self.flip = self.moments or bool(meta["flip"])
        self.latent_shape = tuple(int(s) for s in meta["latent_shape"])
        self.class_names: list[str] = list(meta["class_names"])
        self.num_classes = len(self.class_names)
        self.in_channels = self.latent_shape[0]
        self.input_size = self.latent_shape[1]
        self.image_size = int(meta["image_size"])
        self.scale = float(meta["scale"])
        self.flip_mode = "stored" if self.flip else "none"
        self._layout = shard_layout(meta)
        num_shards = math.ceil(self.num_images / self.shard_size)
        labels = []
        for s in range(num_shards):
            path = os.path.join(self.root, shard_name(s))
            expected = min(self.shard_size, self.num_images - s * self.shard_size)
            if not os.path.isfile(path):
                raise DataError(f"{root}: {shard_name(s)} is missing ({num_shards} shards expected); {finish}")
            try:
                with safe_open(path, framework="pt") as f:
                    keys = set(f.keys()) - {"labels"}
                    shapes = {k: tuple(f.get_slice(k).get_shape()) for k in keys}
                    shard_labels = f.get_tensor("labels")
            except (SafetensorError, OSError, KeyError, ValueError) as e:
                raise DataError(f"{path}: unreadable shard ({e}); delete it and {finish}") from None
            want = {k: (expected, *shape) for k, shape in self._layout.items()}
            if shapes != want or len(shard_labels) != expected:
                found = ", ".join(f"{k} {list(v)}" for k, v in sorted(shapes.items())) or "no latents"
                wanted = ", ".join(f"{k} {list(v)}" for k, v in sorted(want.items()))
                raise DataError(f"{path}: holds {found}, expected {wanted}; delete it and {finish}")
            labels.append(shard_labels.long())
        self.targets = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long)
        if len(self.targets) != self.num_images:
            raise DataError(f"{root}: {len(self.targets)} latents, meta.json says {self.num_images}; {finish}")
        self._handles: dict[int, Any] = {}
        self._pid = os.getpid()

    def describe(self, flips: bool = True) -> str:
        """One line: what the shards hold and what training on them does with posterior samples and flips
        (``flips``: whether the trainer flips at all, its ``--hflip``)."""
        dtype = self.meta.get("dtype", "float16")
        what = f"{self.root}: {self.num_images} latents {self.latent_shape[1]}x{self.latent_shape[2]}x"
        what += f"{self.in_channels} from {self.image_size}px images, {dtype}"
        if self.moments:
            flip = "a random flip" if flips else "no flip (--hflip off)"
            return (
                f"{what}, posterior moments of each image and its mirror image: a fresh posterior sample and "
                f"{flip} per image and step" + (" (the reference recipe)" if flips else "")
            )
        frozen = f"frozen: one posterior {self.posterior} per image"
        if not flips:
            return f"{what}, {frozen} (the same every epoch), no flips (--hflip off)"
        if self.flip:
            return f"{what}, {frozen} and one of its mirror image (the same every epoch): random flips between the two"
        return f"{what}, {frozen} (the same every epoch), no mirror image: NO horizontal flips"

    def check_sampling(self, sampling: str) -> None:
        """Refuse (one-line ``UserError``) a training config whose ``latent_sampling`` these shards cannot give:
        ``"fresh"`` needs posterior moments, ``"frozen"`` frozen latents."""
        if sampling == "fresh" and not self.moments:
            raise UserError(
                f"{self.root}: holds frozen latents (one posterior {self.posterior} per image, extracted with "
                f"--posterior {self.posterior}), but --latent-sampling fresh (the reference recipe) needs posterior "
                "moments: extract them with python -m minidit.extract_latents (its default --posterior moments), "
                "or pass --latent-sampling frozen to train on these as they are"
            )
        if sampling == "frozen" and self.moments:
            raise UserError(
                f"{self.root}: holds posterior moments, not frozen latents; train on them with "
                "--latent-sampling fresh (or extract frozen ones with --posterior sample)"
            )

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
        """``(x, y)``: ``x`` float32 ``[2, 2, 4, h, w]`` (moments), or frozen ``[4, h, w]``, or
        ``[2, 4, h, w]`` (image, flipped image) with stored flips."""
        n = self.num_images
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} latents")
        index %= n
        s, row = divmod(index, self.shard_size)
        f = self._shard(s)
        parts = [f.get_slice(key)[row] for key in self._layout]
        x = parts[0] if len(parts) == 1 else torch.stack(parts)
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
