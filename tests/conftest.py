import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import minidit

ROOT = Path(__file__).resolve().parents[1]

#: The checkout's folders for user runs and datasets: tests never read or write them (shipped files
#: such as data/toy_classifier.safetensors are read by absolute path, never through the working directory).
GUARDED = (ROOT / "runs", ROOT / "data")

_PASSED = pytest.StashKey[dict]()


def pytest_configure(config):
    """`python -m pytest --nbval` (the CI command) also runs the solution notebooks: on a busy machine their
    kernels get one thread, as the lessons' plugin gives theirs (`minidit.course.pytest_plugin`)."""
    from minidit.course.pytest_plugin import limit_kernel_threads

    config.stash[_THREADS] = limit_kernel_threads()


def pytest_report_header(config):
    return config.stash.get(_THREADS, None)


_THREADS = pytest.StashKey["str | None"]()


def snapshot(roots=GUARDED) -> dict[str, int | None]:
    """Modification times of ``roots``, their entries and their subfolders' entries (two levels: cheap
    even when data/ holds a dataset). Creating, deleting, renaming or rewriting anything there changes it."""
    state: dict[str, int | None] = {}
    for root in roots:
        if not root.is_dir():
            state[str(root)] = None
            continue
        state[str(root)] = root.stat().st_mtime_ns
        for entry in os.scandir(root):
            state[entry.path] = entry.stat(follow_symlinks=False).st_mtime_ns
            if entry.is_dir(follow_symlinks=False):
                for sub in os.scandir(entry.path):
                    state[sub.path] = sub.stat(follow_symlinks=False).st_mtime_ns
    return state


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    item.stash.setdefault(_PASSED, {})[report.when] = report.passed
    return report


@pytest.fixture(autouse=True)
def isolated(request, tmp_path):
    """Every test runs in its own empty working directory (its ``tmp_path``), so default paths such as
    ``runs/toy`` or ``data/cifar10`` land there; it fails if the checkout's runs/ or data/ changed; and a
    passed test's ``tmp_path`` is deleted (checkpoints add up: a failed test's stays, to be looked at)."""
    before, cwd = snapshot(), os.getcwd()
    os.chdir(tmp_path)
    try:
        yield tmp_path
    finally:
        os.chdir(cwd)
    after = snapshot()
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k, -1) != after.get(k, -1))
    if changed:
        pytest.fail(f"the test changed the checkout's runs/ or data/: {', '.join(changed[:5])}")
    if request.node.stash.get(_PASSED, {}).get("call", False):
        shutil.rmtree(tmp_path, ignore_errors=True)


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


def save_image(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(arr, dtype=np.uint8)).save(path)


def random_image(rng, h, w):
    return rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def make_folder(root, counts=(4, 3, 3), size=64, seed=0):
    """Class folders c0, c1, ... with ``counts`` random ``size``-px PNGs each (some nested)."""
    rng = np.random.default_rng(seed)
    for c, k in enumerate(counts):
        for i in range(k):
            sub = "nested/" if i == k - 1 else ""
            save_image(root / f"c{c}" / f"{sub}img{i}.png", random_image(rng, size, size))
    return root


@pytest.fixture(scope="session")
def tiny_vae_dir(tmp_path_factory):
    """A randomly initialised AutoencoderKL with the SD VAE's layout in miniature: 4 blocks (8x), 4 latent channels."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=32,
    )
    path = tmp_path_factory.mktemp("tiny_vae")
    vae.save_pretrained(path)
    return path


CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _py2_pickle_meta(label_names, per_batch):
    """``batches.meta`` byte for byte as Python 2 pickled it (protocol 2): its strings are Python 2 ``str``
    (SHORT_BINSTRING), which Python 3 reads back only with an ``encoding``."""

    def py2_str(text):
        data = text.encode("latin1")
        return b"U" + bytes([len(data)]) + data

    names = b"".join(py2_str(name) for name in label_names)
    return (
        b"\x80\x02}("  # PROTO 2, EMPTY_DICT, MARK
        + py2_str("num_cases_per_batch") + b"J" + per_batch.to_bytes(4, "little")  # BININT
        + py2_str("label_names") + b"](" + names + b"e"  # EMPTY_LIST, MARK, ..., APPENDS
        + py2_str("num_vis") + b"J" + (3072).to_bytes(4, "little")
        + b"u."  # SETITEMS, STOP
    )  # fmt: skip


def write_fake_cifar10(root, per_batch=4, seed=0, protocol=2):
    """A small CIFAR-10 as the official archive extracts it (torchvision's layout): ``root/cifar-10-batches-py/``
    with ``data_batch_1..5`` and ``test_batch`` (pickled dicts: ``data`` uint8 rows [n, 3072] of 1024 red,
    1024 green then 1024 blue values; ``labels``; ``batch_label``; ``filenames``) and ``batches.meta``
    (``label_names`` = CIFAR10_NAMES, as Python 2 wrote it).

    Returns ``{file name: (images uint8 [n, 32, 32, 3], labels list of n ints)}`` for the 6 batch files.
    """
    import pickle

    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        images = rng.integers(0, 256, size=(per_batch, 32, 32, 3), dtype=np.uint8)
        labels = rng.integers(0, 10, size=per_batch).tolist()
        entry = {
            "batch_label": name,
            "labels": labels,
            "data": images.transpose(0, 3, 1, 2).reshape(per_batch, 3072),  # [n, H, W, 3] -> R, G, B planes
            "filenames": [f"{name}_{i}.png" for i in range(per_batch)],
        }
        (folder / name).write_bytes(pickle.dumps(entry, protocol=protocol))
        batches[name] = (images, labels)
    (folder / "batches.meta").write_bytes(_py2_pickle_meta(CIFAR10_NAMES, per_batch))
    return batches
