"""Sample quality: FID against real images, and the toy-data metrics.

FID (Heusel et al., 2017) is the Fréchet distance between two Gaussians fitted to Inception-V3 pool
features (2048 per image) of generated and of real images::

    FID = |mu1 - mu2|^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2))

Why torch-fidelity's InceptionV3: published FIDs (DiT's included, via OpenAI's ADM evaluator) use the
2015 TensorFlow Inception graph, and torchvision's InceptionV3 is a different network that gives
different numbers. torch-fidelity's ``inception-v3-compat`` extractor is those TF weights ported to
PyTorch with TF1's bilinear resize, and is tested to reproduce the TF features, so our FIDs can be
compared with published ones. It is maintained (v0.4.0 as of writing), takes uint8 images of any size,
and the same network also gives the Inception Score (its ``logits_unbiased`` output) should we want IS.
It is an optional dependency, imported only when FID needs it.

From torch-fidelity only the network is used. Its ``calculate_metrics`` computes FID from folders and
CIFAR-10 too, but what is written here it does not do: the Fréchet distance with ``sqrtm`` as the published
evaluators (its trace comes from eigenvalues; here it is lesson material), ``.npz`` samples (the ADM format)
and ``mu``/``sigma`` files, a cache that notices changed files (it caches a folder only under a name the user
gives), CIFAR-10 read without running code (it uses torchvision's ``pickle.load``), its weights read with
``weights_only=True`` (it uses ``False``), and one-line errors (it raises assertion tracebacks). All of it
works with any feature extractor: a callable from uint8 images [B, 3, H, W] to float features [B, F].

Images are uint8 [N, H, W, 3] arrays, as the samplers write them: an ``.npz`` with the images in
``arr_0`` (the format of OpenAI's ADM evaluator; ``labels`` optional), or a folder of image files.
Reference statistics (``mu`` [F], ``sigma`` [F, F]) are cached as ``.npz`` under ``data/fid_stats/``.

    python -m minidit.evaluate fid samples.npz --ref cifar10         # FID against CIFAR-10 train
    python -m minidit.evaluate fid samples.npz --ref real_images/     # ... or a folder, or an .npz
    python -m minidit.evaluate toy samples.npz                       # toy data: accuracy, Fréchet-toy
    python -m minidit.evaluate stats cifar10 --out cifar10_stats.npz # precompute reference statistics
"""

from __future__ import annotations

import hashlib
import http.client
import importlib
import os
import re
import sys
import warnings
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .checkpoint import CheckpointError, read_file
from .data import cifar10_files, load_cifar10_arrays, socket_timeout
from .errors import ArgumentParser, DataError, UserError, positive_int, run_cli
from .fileio import save_npz
from .runtime import resolve_device

#: A feature extractor: uint8 images [B, 3, H, W] -> float features [B, F] (a 1-tuple of that is accepted too).
Extractor = Callable[[torch.Tensor], torch.Tensor]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
DEFAULT_CIFAR10_ROOT = Path("data/cifar10")
DEFAULT_STATS_DIR = Path("data/fid_stats")
INCEPTION_NAME = "inception-v3-compat"
TORCH_FIDELITY_PIP = "pip install 'torch-fidelity>=0.3'"


class FrechetError(UserError, ValueError):
    """The Fréchet distance cannot be computed reliably (too few samples for the feature dimension)."""


class FrechetWarning(UserWarning):
    """The covariance product was singular and was regularised (one line under the command line)."""


# --------------------------------------------------------------------------
# The Fréchet distance and feature statistics
# --------------------------------------------------------------------------


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2): mu [F], sigma [F, F] -> float.

    d^2 = |mu1 - mu2|^2 + Tr(sigma1) + Tr(sigma2) - 2 Tr((sigma1 sigma2)^(1/2)).

    The matrix square root is ``scipy.linalg.sqrtm`` of the product sigma1 @ sigma2, exactly as in the
    evaluators that published FIDs come from (OpenAI's ADM evaluator, pytorch-fid), so that our numbers
    match theirs to the last digits. The eigen-decomposition of the symmetric sigma1^(1/2) sigma2 sigma1^(1/2)
    would give the same trace (same eigenvalues) and is what the tests compare against. As in those
    evaluators: if the product is singular enough that sqrtm returns non-finite values, ``eps`` is added to
    both diagonals and the root taken again; rounding leaves a tiny imaginary part, which is dropped, but an
    imaginary diagonal above 1e-3 means the estimate is broken (usually far fewer samples than features)
    and raises ``FrechetError``.
    """
    try:
        from scipy import linalg
    except ImportError:
        raise UserError("the Fréchet distance needs scipy: pip install scipy") from None
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or mu1.ndim != 1:
        raise ValueError(f"means must be vectors of one length, got shapes {mu1.shape} and {mu2.shape}")
    if sigma1.shape != sigma2.shape or sigma1.shape != (len(mu1), len(mu1)):
        raise ValueError(f"covariances must be [{len(mu1)}, {len(mu1)}], got {sigma1.shape} and {sigma2.shape}")

    diff = mu1 - mu2
    with warnings.catch_warnings():  # scipy's "matrix is singular": handled below, and said by the callers
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(sigma1 @ sigma2)
        if not np.isfinite(covmean).all():
            message = f"Fréchet distance: singular product; adding {eps} to the covariance diagonals"
            warnings.warn(message, FrechetWarning, stacklevel=2)
            offset = np.eye(len(mu1)) * eps
            covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise FrechetError(
                f"Fréchet distance: the covariance square root has an imaginary part of "
                f"{np.max(np.abs(covmean.imag)):.3g}: use more samples than features ({len(mu1)})"
            )
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance of features [N, F] -> (mu float64 [F], sigma float64 [F, F]).

    The same as ``features.mean(0)`` and ``np.cov(features, rowvar=False)``; needs N >= 2.
    """
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2:
        raise ValueError(f"features must be [N, F], got shape {features.shape}")
    if len(features) < 2:
        raise DataError(f"statistics need at least 2 images, got {len(features)}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


# --------------------------------------------------------------------------
# Feature extraction
# --------------------------------------------------------------------------


def _to_nchw_uint8(batch) -> torch.Tensor:
    """One batch of images -> torch uint8 [B, 3, H, W]: numpy arrays are [B, H, W, 3], tensors [B, 3, H, W]."""
    if isinstance(batch, np.ndarray):
        check_images(batch)
        return torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2)
    if isinstance(batch, torch.Tensor):
        if batch.dtype != torch.uint8 or batch.dim() != 4 or batch.shape[1] != 3:
            raise DataError(f"image tensors must be uint8 [N, 3, H, W], got {batch.dtype} {tuple(batch.shape)}")
        return batch
    raise DataError(f"images must be numpy uint8 [N, H, W, 3] or torch uint8 [N, 3, H, W], got {type(batch).__name__}")


def compute_features(
    images,
    extractor: Extractor,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    progress: bool = True,
    desc: str = "features",
) -> np.ndarray:
    """Features of images, batch by batch: -> float64 [N, F].

    images: numpy uint8 [N, H, W, 3], torch uint8 [N, 3, H, W], or an iterable of such batches (streamed).
    extractor: callable uint8 [B, 3, H, W] on ``device`` -> float [B, F] (or a 1-tuple of it, as
    torch-fidelity's extractors return); an ``nn.Module`` is moved to ``device`` first.
    device: default ``"auto"`` (``minidit.runtime.resolve_device``: CUDA when available, else MPS, else CPU).
    """
    device = resolve_device(device or "auto")
    if isinstance(extractor, torch.nn.Module):
        extractor.to(device)
    if isinstance(images, np.ndarray | torch.Tensor):
        _to_nchw_uint8(images[:1])  # check the format once, before any work
        total = len(images)
        batches: Iterable = (images[i : i + batch_size] for i in range(0, total, batch_size))
    else:
        total, batches = None, images
    chunks = []
    with tqdm(total=total, desc=desc, unit="img", disable=not progress, dynamic_ncols=True) as bar:
        for batch in batches:
            x = _to_nchw_uint8(batch).to(device)
            with torch.no_grad():
                f = extractor(x)
            if isinstance(f, tuple | list):
                f = f[0]
            if f.dim() != 2 or len(f) != len(x):
                raise ValueError(f"the extractor must return [B, F] features; got {tuple(f.shape)} for {len(x)} images")
            chunks.append(f.detach().to("cpu", torch.float64).numpy())
            bar.update(len(x))
    if not chunks:
        raise DataError("no images to compute features of")
    return np.concatenate(chunks)


def inception_weights_path() -> Path:
    """Where torch-fidelity's InceptionV3 weights are cached: ``<torch hub dir>/checkpoints/<file>``.

    torch-fidelity downloads them with ``torch.hub.load_state_dict_from_url``, which keeps them in
    ``torch.hub.get_dir()/checkpoints`` (``$TORCH_HOME/hub/checkpoints``, by default
    ``~/.cache/torch/hub/checkpoints``) and never downloads again once the file is there.
    """
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(URL_INCEPTION_V3)


def inception_extractor(device: str | torch.device | None = None) -> torch.nn.Module:
    """torch-fidelity's TF-compatible InceptionV3, the FID feature extractor, in eval mode on ``device``.

    uint8 [B, 3, H, W] (any H, W: resized to 299x299 inside, as TF1 did) -> a 1-tuple of pool features
    float32 [B, 2048]; its ``name`` is ``"inception-v3-compat"``. Downloads its weights (~100 MB) on first use.
    Raises ``UserError`` if torch-fidelity is not installed, if the weights are not cached and cannot be
    downloaded (the message says where to put the file by hand), or if the cached file is unreadable or
    would run code.
    """
    device = resolve_device(device or "auto")
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3
    except ImportError:
        raise UserError(f"FID needs torch-fidelity for its InceptionV3 network: {TORCH_FIDELITY_PIP}") from None
    path = inception_weights_path()
    offline = (
        f"Download {URL_INCEPTION_V3} where there is internet and put the file at {path} (torch hub's cache, "
        "$TORCH_HOME/hub/checkpoints)"
    )
    try:
        # Download it ourselves, where torch-fidelity would (torch.hub's cache), so that a failure is one
        # clean error; torch-fidelity then finds the file there. download_url_to_file checks the sha256
        # prefix in the file name, and writes a temporary file that it renames only when complete.
        if not path.is_file():
            match = torch.hub.HASH_REGEX.search(path.name)
            path.parent.mkdir(parents=True, exist_ok=True)
            with socket_timeout(60):
                torch.hub.download_url_to_file(URL_INCEPTION_V3, str(path), match and match.group(1), progress=True)
    except (OSError, http.client.HTTPException) as e:  # URLError, ConnectionError, TimeoutError are OSErrors
        reason = getattr(e, "reason", None) or e
        raise UserError(
            f"could not download torch-fidelity's InceptionV3 weights ({reason}); offline? {offline}"
        ) from None
    except RuntimeError as e:  # a download that failed its checksum
        raise UserError(
            f"could not download torch-fidelity's InceptionV3 weights ({_first_line(e)}). {offline}"
        ) from None
    try:
        # torch-fidelity reads the file with torch.load(weights_only=False), which runs any code a tampered file
        # holds: read it first as minidit reads every checkpoint (weights_only=True), refusing what that refuses.
        read_file(path, kind="torch")
        net = FeatureExtractorInceptionV3(INCEPTION_NAME, ["2048"])
    except (CheckpointError, RuntimeError, EOFError) as e:  # CheckpointError: corrupt, or refused (it runs code)
        reason = str(e).removeprefix(f"{path}: ").split(". ")[0] if isinstance(e, CheckpointError) else _first_line(e)
        raise UserError(
            f"the cached InceptionV3 weights {path} are unreadable ({reason}): delete the file and retry"
        ) from None
    return net.eval().to(device)


def _first_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def _extractor_name(extractor: Extractor) -> str:
    """A file-name-safe identity of an extractor, for cache files: its ``name``, else its class or function name."""
    name = getattr(extractor, "name", None)
    if not isinstance(name, str):
        name = getattr(extractor, "__name__", None) or type(extractor).__name__
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


# --------------------------------------------------------------------------
# Images: .npz files, folders, CIFAR-10
# --------------------------------------------------------------------------
# torch-fidelity reads folders too (ImagesPathDataset), but only inside calculate_metrics and its DataLoader,
# where images of two sizes are a torch.stack traceback; this reader streams batches to any extractor and
# makes a bad or odd-sized image one line. CIFAR-10 comes from minidit.data (read without running code).


def check_images(images: np.ndarray, what: str = "images") -> np.ndarray:
    """Check that ``images`` is a non-empty uint8 [N, H, W, 3] array; return it."""
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
        dtype = images.dtype if hasattr(images, "dtype") else type(images).__name__
        raise DataError(f"{what} must be uint8 [N, H, W, 3] in 0..255, got dtype {dtype}")
    if images.ndim != 4 or images.shape[-1] != 3:
        raise DataError(f"{what} must be uint8 [N, H, W, 3] (RGB, channels last), got shape {list(images.shape)}")
    if len(images) == 0:
        raise DataError(f"{what} holds no images (shape {list(images.shape)})")
    return images


def _open_npz(path: Path) -> np.lib.npyio.NpzFile:
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise DataError(f"{path}: not a readable .npz file ({e})") from None


def _read_npz_array(path: Path, key: str) -> np.ndarray:
    with _open_npz(path) as npz:
        if key not in npz.files:
            raise DataError(f"{path}: no '{key}' array in it (it has: {', '.join(npz.files) or 'nothing'})")
        try:
            return npz[key]
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
            raise DataError(f"{path}: cannot read '{key}' ({e})") from None


def _image_files(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise DataError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}) in it or its subfolders")
    return files


def _folder_batches(files: list[Path], batch_size: int) -> Iterator[np.ndarray]:
    """Decode image files batch by batch -> uint8 [B, H, W, 3]; all images must have one size."""
    from PIL import Image, UnidentifiedImageError

    size = None
    for i in range(0, len(files), batch_size):
        batch = []
        for file in files[i : i + batch_size]:
            try:
                with Image.open(file) as im:
                    array = np.asarray(im.convert("RGB"))
            except (OSError, UnidentifiedImageError) as e:
                raise DataError(f"{file}: not a readable image ({e})") from None
            if size is None:
                size = (array.shape, file)
            elif array.shape != size[0]:
                raise DataError(
                    f"{file} is {array.shape[1]}x{array.shape[0]} but {size[1]} is {size[0][1]}x{size[0][0]}: "
                    "all images must have one size"
                )
            batch.append(array)
        yield np.stack(batch)


def load_images(source: str | os.PathLike) -> np.ndarray:
    """All images of an ``.npz`` (``arr_0``) or of a folder (recursive, sorted by path) -> uint8 [N, H, W, 3]."""
    path = Path(source)
    if path.is_dir():
        return np.concatenate(list(_folder_batches(_image_files(path), 256)))
    if path.suffix.lower() != ".npz" and path.exists():
        raise DataError(f"{path}: expected an .npz file or a folder of images")
    return check_images(_read_npz_array(path, "arr_0"), f"{path}: arr_0")


def _source_images(source, batch_size: int) -> Iterable | np.ndarray | torch.Tensor:
    """Images to extract features from: an array or tensor as given (checked), or batches of a folder or .npz."""
    if isinstance(source, np.ndarray):
        return check_images(source)
    if isinstance(source, torch.Tensor):
        return _to_nchw_uint8(source)
    path = Path(source)
    if path.is_dir():
        return _folder_batches(_image_files(path), batch_size)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    return load_images(path)


# --------------------------------------------------------------------------
# Reference statistics, with a cache
# --------------------------------------------------------------------------


@dataclass
class Statistics:
    """Feature statistics of a set of images: mu float64 [F], sigma float64 [F, F], from ``n`` images."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int | None = None
    label: str = ""  # what the images were, for reports
    extractor: str = ""  # the feature extractor's name
    key: str = ""  # source fingerprint + extractor, for cache files

    def __iter__(self):  # mu, sigma = stats
        return iter((self.mu, self.sigma))


def save_statistics(path: str | os.PathLike, stats: Statistics) -> None:
    """Write statistics as ``.npz`` (``mu``, ``sigma``, ``n``, ``label``, ``extractor``, ``key``), atomically."""
    arrays = {"mu": stats.mu, "sigma": stats.sigma, "n": np.int64(stats.n if stats.n is not None else -1)}
    arrays |= {"label": np.str_(stats.label), "extractor": np.str_(stats.extractor), "key": np.str_(stats.key)}
    save_npz(path, **arrays)


def load_statistics(path: str | os.PathLike) -> Statistics:
    """Read ``mu`` [F] and ``sigma`` [F, F] (and what else we saved) from an ``.npz``."""
    path = Path(path)
    with _open_npz(path) as npz:
        if not {"mu", "sigma"} <= set(npz.files):
            raise DataError(f"{path}: no 'mu' and 'sigma' arrays in it (it has: {', '.join(npz.files) or 'nothing'})")
        mu, sigma = npz["mu"].astype(np.float64), npz["sigma"].astype(np.float64)
        n = int(npz["n"]) if "n" in npz.files and int(npz["n"]) >= 0 else None
        label = str(npz["label"]) if "label" in npz.files else path.name
        extractor = str(npz["extractor"]) if "extractor" in npz.files else ""
        key = str(npz["key"]) if "key" in npz.files else ""
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        raise DataError(f"{path}: mu must be [F] and sigma [F, F], got {list(mu.shape)} and {list(sigma.shape)}")
    return Statistics(mu, sigma, n, label, extractor, key)


def _fingerprint(files: list[Path]) -> str:
    """8 hex digits that change when any of the files is replaced, resized or touched."""
    h = hashlib.sha1()
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:8]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "images"


def reference_statistics(
    source,
    extractor: Extractor | None = None,
    *,
    cache: bool | str | os.PathLike = True,
    cache_dir: str | os.PathLike = DEFAULT_STATS_DIR,
    root: str | os.PathLike = DEFAULT_CIFAR10_ROOT,
    download: bool = True,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> Statistics:
    """Feature statistics of real images -> ``Statistics`` (unpacks as ``mu, sigma``: float64 [F], [F, F]).

    source: ``"cifar10"`` (the 50k training images under ``root``, downloaded if missing), a folder of
    images, an ``.npz`` of images (``arr_0``) or of statistics (``mu``, ``sigma``: returned as they are),
    a uint8 array [N, H, W, 3], ``Statistics`` or a ``(mu, sigma)`` pair.
    extractor: default torch-fidelity's InceptionV3 (``inception_extractor``).
    cache: ``True`` keeps statistics of files in ``cache_dir/<name>-<fingerprint>-<extractor>.npz`` (the
    fingerprint changes when the files do), a path keeps them there, ``False`` recomputes every time.
    """
    # Precomputed statistics: nothing to extract.
    if isinstance(source, Statistics):
        return source
    if isinstance(source, tuple) and len(source) == 2:
        return Statistics(np.asarray(source[0], np.float64), np.asarray(source[1], np.float64), label="given")
    if isinstance(source, str | os.PathLike) and str(source).lower() != "cifar10":
        path = Path(source)
        if not path.exists():
            raise DataError(f"{path}: no such file or folder (a reference is 'cifar10', a folder of images or an .npz)")
        if path.is_file():
            if path.suffix.lower() != ".npz":
                raise DataError(f"{path}: a reference is 'cifar10', a folder of images or an .npz file")
            with _open_npz(path) as npz:
                names = set(npz.files)
            if {"mu", "sigma"} <= names:
                return load_statistics(path)
            if "arr_0" not in names:
                raise DataError(f"{path}: neither images ('arr_0') nor statistics ('mu', 'sigma') in it")

    # Images: look in the cache first.
    is_cifar10 = isinstance(source, str) and source.lower() == "cifar10"
    if isinstance(source, np.ndarray | torch.Tensor):
        label, files = "array", None
    elif is_cifar10:
        label, files = "cifar10-train", cifar10_files(root, train=True, download=download)
    else:
        path = Path(source)
        label = path.stem if path.is_file() else path.resolve().name
        files = _image_files(path) if path.is_dir() else [path]
    extractor = extractor if extractor is not None else inception_extractor(device)
    ext_name = _extractor_name(extractor)
    cache_file, key = None, ""
    if cache is not False and files is not None:
        key = f"{label}-{_fingerprint(files)}-{ext_name}"
        cache_file = Path(cache_dir) / f"{_slug(key)}.npz" if cache is True else Path(cache)
        if cache_file.is_file():
            try:
                stats = load_statistics(cache_file)
            except DataError:
                stats = None  # unreadable: recompute and overwrite
            if stats is not None and stats.key == key:
                return stats

    if is_cifar10:
        images = load_cifar10_arrays(root, train=True, download=download)[0]  # the 50,000 training images
    else:
        images = _source_images(source, batch_size)
    features = compute_features(images, extractor, batch_size, device, progress, desc=f"reference {label}")
    stats = Statistics(*feature_statistics(features), n=len(features), label=label, extractor=ext_name, key=key)
    if cache_file is not None:
        save_statistics(cache_file, stats)
    return stats


# --------------------------------------------------------------------------
# FID
# --------------------------------------------------------------------------


class FIDResult(float):
    """An FID: the number itself (a float), with what it was measured on, for reports: ``n_samples``, the
    ``reference`` statistics and the ``extractor``'s name."""

    def __new__(cls, value: float, n_samples: int, reference: Statistics, extractor: str):
        result = super().__new__(cls, value)
        result.n_samples, result.reference, result.extractor = n_samples, reference, extractor
        return result


def fid(
    samples,
    reference,
    extractor: Extractor | None = None,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    **reference_kwargs,
) -> FIDResult:
    """FID of samples against a reference -> a float (an ``FIDResult``, which also says what was compared).

    samples: an ``.npz`` (``arr_0``: uint8 [N, H, W, 3]), a folder of images, a uint8 array [N, H, W, 3]
    or a uint8 tensor [N, 3, H, W]. reference: what ``reference_statistics`` takes (``"cifar10"``, a folder,
    an ``.npz`` of images or of ``mu``/``sigma``, ...). extractor: default torch-fidelity's InceptionV3.
    ``reference_kwargs`` (cache, cache_dir, root, download, progress) go to ``reference_statistics``.
    FID is biased upward for small N: published numbers use 50,000 samples (10,000 at least).
    """
    progress = reference_kwargs.get("progress", True)
    if isinstance(samples, str | os.PathLike) and not Path(samples).exists():
        raise DataError(f"{samples}: no such file or folder")
    if isinstance(reference, str | os.PathLike) and str(reference).lower() != "cifar10":
        if not Path(reference).exists():
            raise DataError(f"reference {reference}: not 'cifar10' and no such file or folder")
    images = _source_images(samples, batch_size)  # checks the samples before any long computation
    extractor = extractor if extractor is not None else inception_extractor(device)
    ref = reference_statistics(reference, extractor, batch_size=batch_size, device=device, **reference_kwargs)
    features = compute_features(images, extractor, batch_size, device, progress, desc="samples")
    mu, sigma = feature_statistics(features)
    if mu.shape != ref.mu.shape:
        raise DataError(
            f"the reference statistics have {len(ref.mu)} features but the samples {len(mu)}: "
            "were they computed with another feature extractor?"
        )
    value = frechet_distance(mu, sigma, ref.mu, ref.sigma)
    return FIDResult(value, len(features), ref, _extractor_name(extractor))


# --------------------------------------------------------------------------
# Toy-data metrics
# --------------------------------------------------------------------------


def _toy_images(images, what: str = "images") -> torch.Tensor:
    """Toy images -> float32 [N, 3, S, S] in [-1, 1]; uint8 input is [N, H, W, 3] (numpy or torch)."""
    x = torch.as_tensor(images)
    if x.dtype == torch.uint8:
        if x.dim() != 4 or x.shape[-1] != 3:
            raise DataError(f"uint8 {what} must be [N, H, W, 3], got shape {list(x.shape)}")
        return x.permute(0, 3, 1, 2).float() / 127.5 - 1
    if not x.is_floating_point() or x.dim() != 4 or x.shape[1] != 3:
        raise DataError(f"{what} must be float [N, 3, S, S] in [-1, 1] or uint8 [N, H, W, 3], got {x.dtype} "
                        f"{list(x.shape)}")  # fmt: skip
    return x.float()


@torch.no_grad()
def _classifier_outputs(classifier, images: torch.Tensor, batch_size: int, device, logits: bool):
    """(logits [N, C] or None, features float64 [N, F]) of float images [N, 3, S, S], batch by batch."""
    all_logits, all_features = [], []
    for chunk in images.split(batch_size):
        x = chunk.to(device)
        if logits:
            all_logits.append(classifier(x).float().cpu())
        all_features.append(classifier.features(x).to("cpu", torch.float64))
    return (torch.cat(all_logits) if logits else None), torch.cat(all_features).numpy()


def toy_metrics(
    images,
    labels,
    classifier=None,
    real_images=None,
    *,
    n_real: int | None = None,
    batch_size: int = 256,
    device: str | torch.device | None = None,
    classifier_path: str | os.PathLike | None = None,
) -> dict:
    """How well samples of the toy data match their classes and the real images.

    images: float [N, 3, S, S] in [-1, 1] or uint8 [N, H, W, 3]; labels: int [N], the classes asked for.
    classifier: has ``forward(x) -> logits [N, C]`` and ``features(x) -> [N, F]`` on float images in
    [-1, 1] (eval mode); default ``minidit.toy.load_classifier(classifier_path)``.
    real_images: as ``images``; default ``n_real`` (default N) fresh toy images,
    ``minidit.toy.make_batch(torch.arange(10**6, 10**6 + n_real), seed=12345, image_size=S)``
    (a seed and indices that no training run uses).

    Returns ``{"accuracy": fraction classified as their label, "per_class_accuracy": [C] list (NaN for a
    class with no samples), "frechet_toy": Fréchet distance of the classifier's features of samples vs
    real images, "num_samples": N, "num_real": M, "num_features": F}``. The Fréchet distance needs
    N and M well above F to mean much.
    """
    x = _toy_images(images)
    labels = torch.as_tensor(np.asarray(labels)).long().reshape(-1)
    if len(labels) != len(x):
        raise DataError(f"{len(x)} images but {len(labels)} labels")
    if len(x) < 2:
        raise DataError(f"toy metrics need at least 2 images, got {len(x)}")
    if classifier is None or real_images is None:
        toy = importlib.import_module("minidit.toy")  # only now: minidit.evaluate does not need it otherwise
        if classifier is None:
            classifier = toy.load_classifier(classifier_path)
    if device is None:
        params = list(classifier.parameters()) if isinstance(classifier, torch.nn.Module) else []
        device = params[0].device if params else torch.device("cpu")

    logits, sample_features = _classifier_outputs(classifier, x, batch_size, device, logits=True)
    num_classes = logits.shape[1]
    if labels.min() < 0 or labels.max() >= num_classes:
        raise DataError(f"labels must be in 0..{num_classes - 1}, got {int(labels.min())}..{int(labels.max())}")
    correct = (logits.argmax(dim=1) == labels).double()
    per_class = [
        float(correct[labels == c].mean()) if (labels == c).any() else float("nan") for c in range(num_classes)
    ]

    if real_images is None:
        n_real = len(x) if n_real is None else n_real
        chunks = []
        for start in range(0, n_real, batch_size):  # image i depends only on its index: chunks change nothing
            indices = torch.arange(10**6 + start, 10**6 + min(start + batch_size, n_real))
            real, _ = toy.make_batch(indices, seed=12345, image_size=x.shape[-1])
            chunks.append(_classifier_outputs(classifier, real, batch_size, device, logits=False)[1])
        real_features = np.concatenate(chunks)
    else:
        real = _toy_images(real_images, "real images")
        real_features = _classifier_outputs(classifier, real, batch_size, device, logits=False)[1]

    mu1, sigma1 = feature_statistics(sample_features)
    mu2, sigma2 = feature_statistics(real_features)
    return {
        "accuracy": float(correct.mean()),
        "per_class_accuracy": per_class,
        "frechet_toy": frechet_distance(mu1, sigma1, mu2, sigma2),
        "num_samples": len(x),
        "num_real": len(real_features),
        "num_features": sample_features.shape[1],
    }


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------


def _check_reference_arg(ref: str) -> str:
    if ref.lower() != "cifar10" and not Path(ref).exists():
        raise UserError(f"unknown --ref {ref!r}: not 'cifar10', and no such folder or .npz file")
    return ref


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m minidit.evaluate", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="{fid,toy,stats}")

    def common(p, batch_size):
        p.add_argument("--batch-size", type=positive_int, default=batch_size, help=f"default {batch_size}")
        p.add_argument(
            "--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: auto: CUDA, MPS or CPU)"
        )
        p.add_argument("--no-progress", action="store_true", help="no progress bars")

    p = commands.add_parser("fid", help="FID of samples against real images (torch-fidelity's InceptionV3)")
    p.add_argument("samples", help=".npz with uint8 [N, H, W, 3] images in arr_0, or a folder of images")
    p.add_argument("--ref", required=True, help="cifar10, a folder of images, or an .npz (images or mu/sigma)")
    p.add_argument("--data-root", default=str(DEFAULT_CIFAR10_ROOT), help="where CIFAR-10 is (default %(default)s)")
    p.add_argument("--cache-dir", default=str(DEFAULT_STATS_DIR), help="reference statistics (default %(default)s)")
    p.add_argument("--no-cache", action="store_true", help="recompute the reference statistics")
    common(p, 64)

    p = commands.add_parser("toy", help="toy data: class accuracy and Fréchet distance in classifier features")
    p.add_argument("samples", help=".npz with uint8 [N, H, W, 3] images in arr_0 and their classes in labels")
    p.add_argument("--classifier", default=None, help="toy classifier weights (default: the shipped one)")
    p.add_argument("--n-real", type=positive_int, default=None, help="real toy images to compare with (default N)")
    common(p, 256)

    p = commands.add_parser("stats", help="precompute reference statistics (mu, sigma) into an .npz")
    p.add_argument("source", help="cifar10, a folder of images, or an .npz of images")
    p.add_argument("--out", required=True, help="output .npz")
    p.add_argument("--data-root", default=str(DEFAULT_CIFAR10_ROOT), help="where CIFAR-10 is (default %(default)s)")
    common(p, 64)

    args = parser.parse_args(argv)
    progress = not args.no_progress
    device = resolve_device(args.device)

    if args.command == "fid":
        _check_reference_arg(args.ref)
        if not Path(args.samples).exists():
            raise DataError(f"{args.samples}: no such file or folder")
        result = fid(
            args.samples, args.ref, None, args.batch_size, device,
            cache=not args.no_cache, cache_dir=args.cache_dir, root=args.data_root, progress=progress,
        )  # fmt: skip
        ref = result.reference
        ref_n = f", {ref.n} images" if ref.n else ""
        print(
            f"FID: {result:.2f} ({result.n_samples} samples vs reference {ref.label}{ref_n}; "
            f"{result.extractor} features)"
        )
        if result.n_samples < len(ref.mu):
            print(f"note: fewer samples than features ({len(ref.mu)}): this FID is strongly biased", file=sys.stderr)
    elif args.command == "toy":
        images = check_images(_read_npz_array(Path(args.samples), "arr_0"), f"{args.samples}: arr_0")
        labels = _read_npz_array(Path(args.samples), "labels")
        if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer):
            raise DataError(f"{args.samples}: labels must be integers [{len(images)}], got {labels.dtype} "
                            f"{list(labels.shape)}")  # fmt: skip
        m = toy_metrics(
            images, labels, n_real=args.n_real, batch_size=args.batch_size, device=device,
            classifier_path=args.classifier,
        )  # fmt: skip
        names = importlib.import_module("minidit.toy").CLASS_NAMES
        print(f"accuracy: {100 * m['accuracy']:.2f}% ({m['num_samples']} samples)")
        per_class = ", ".join(f"{names[c]}: {100 * a:.1f}%" for c, a in enumerate(m["per_class_accuracy"]) if a == a)
        print(f"per-class accuracy: {per_class}")
        print(f"Frechet-toy: {m['frechet_toy']:.4f} (vs {m['num_real']} real toy images)")
        if min(m["num_samples"], m["num_real"]) <= m["num_features"]:
            print(
                f"note: Frechet-toy is unreliable with no more images than the classifier's {m['num_features']} "
                f"features: use more than {m['num_features']} samples (and --n-real)",
                file=sys.stderr,
            )
    else:
        if args.source.lower() != "cifar10" and not Path(args.source).exists():
            raise DataError(f"{args.source}: not 'cifar10', and no such folder or .npz file")
        stats = reference_statistics(
            args.source, None, cache=False, root=args.data_root,
            batch_size=args.batch_size, device=device, progress=progress,
        )  # fmt: skip
        save_statistics(args.out, stats)
        n = f" from {stats.n} images" if stats.n else ""
        print(f"wrote {args.out}: mu [{len(stats.mu)}], sigma [{len(stats.mu)}, {len(stats.mu)}]{n} of {stats.label}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
