"""Real-data loading (image folders, CIFAR-10, latent shards), the VAE wrapper, and latent extraction.

Everything runs offline on the CPU: CIFAR-10 is a small fake in torchvision's on-disk
format, the VAE a tiny randomly initialised ``AutoencoderKL`` with the SD VAE's 8x
downsampling, and torchvision's download is replaced by one that fails like an
offline machine.
"""

import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CIFAR10_NAMES, make_folder, random_image, save_image, write_fake_cifar10
from PIL import Image
from torchvision.datasets import ImageFolder

from minidit.data import (
    CIFAR10Dataset,
    ImageFolderDataset,
    LatentShards,
    SkippedLinkWarning,
    UnreadableImageWarning,
    build_dataset,
    center_crop_arr,
    cifar10,
    load_cifar10_arrays,
    to_rgb,
    to_signed,
)
from minidit.errors import DataError, UserError, run_cli

ROOT = Path(__file__).resolve().parents[1]

# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tensors here are tiny: one intra-op thread is fastest, and several stall badly on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def one_line(message: str) -> bool:
    return "\n" not in message and len(message) > 0


# --------------------------------------------------------------------------
# center_crop_arr
# --------------------------------------------------------------------------


def test_center_crop_wide_image_keeps_the_centre():
    # 300 x 200 (W x H): stripes red | green | blue at x < 100, < 200, >= 200.
    arr = np.zeros((200, 300, 3), np.uint8)
    arr[:, :100, 0] = 255
    arr[:, 100:200, 1] = 255
    arr[:, 200:, 2] = 255
    out = center_crop_arr(Image.fromarray(arr), 64)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    # the crop covers x in [50, 250) of the original: a red quarter, a green half, a blue quarter
    assert out[32, 2].tolist() == [255, 0, 0]
    assert out[32, 32].tolist() == [0, 255, 0]
    assert out[32, 61].tolist() == [0, 0, 255]


def test_center_crop_tall_and_large_image():
    # 1200 x 3000 (W x H), grey except a green band at rows 1200..1800
    arr = np.full((3000, 1200, 3), 128, np.uint8)
    arr[1200:1800] = (0, 200, 0)
    out = center_crop_arr(Image.fromarray(arr), 32)
    assert out.shape == (32, 32, 3)
    # the crop is the central 1200 x 1200 square (rows 900..2100): the band is its rows 8..24, grey around
    assert np.abs(out[10:22].astype(int) - (0, 200, 0)).max() <= 2
    assert np.abs(out[:5].astype(int) - 128).max() <= 2 and np.abs(out[-5:].astype(int) - 128).max() <= 2


def test_center_crop_halves_with_box_filter():
    # 256 -> 128 -> 64 by two BOX halvings, then a bicubic resize by 1 (identity): 4x4 block means
    rng = np.random.default_rng(0)
    arr = random_image(rng, 256, 256)
    out = center_crop_arr(Image.fromarray(arr), 64)
    halved = Image.fromarray(arr).resize((128, 128), Image.BOX).resize((64, 64), Image.BOX)
    assert np.array_equal(out, np.asarray(halved))
    block_means = arr.reshape(64, 4, 64, 4, 3).astype(float).mean(axis=(1, 3))
    assert np.abs(out - block_means).max() <= 2.0  # PIL rounds (fixed point) after each halving


def test_center_crop_small_and_greyscale_images():
    out = center_crop_arr(Image.fromarray(np.full((20, 30), 77, np.uint8), mode="L"), 32)  # upscaled, 1 channel
    assert out.shape == (32, 32, 3) and (out == 77).all()
    rgba = Image.fromarray(np.full((40, 40, 4), 200, np.uint8), mode="RGBA")
    assert center_crop_arr(rgba, 40).shape == (40, 40, 3)


def test_to_signed_is_bit_identical_to_the_reference_transform():
    from torchvision import transforms

    arr = random_image(np.random.default_rng(1), 16, 16)
    reference = transforms.Compose([transforms.ToTensor(), transforms.Normalize([0.5] * 3, [0.5] * 3)])
    assert torch.equal(to_signed(arr), reference(Image.fromarray(arr)))
    assert to_signed(np.zeros((2, 2, 3), np.uint8)).eq(-1).all()
    assert to_signed(np.full((2, 2, 3), 255, np.uint8)).eq(1).all()


# --------------------------------------------------------------------------
# ImageFolderDataset
# --------------------------------------------------------------------------


def test_image_folder_labels_ranges_and_shapes(tmp_path):
    root = tmp_path / "imgs"
    save_image(root / "zebra" / "a.png", np.full((50, 70, 3), 255))  # white
    save_image(root / "ant" / "deep" / "er" / "x.PNG", np.zeros((40, 40, 3)))  # black, nested, upper-case extension
    save_image(root / "ant" / "y.jpg", np.full((33, 33, 3), 100))
    (root / "ant" / "notes.txt").write_text("not an image")
    save_image(root / ".ipynb_checkpoints" / "z.png", np.zeros((8, 8, 3)))  # hidden: not a class
    ds = ImageFolderDataset(root, 32)
    assert ds.class_names == ["ant", "zebra"] and ds.num_classes == 2
    assert (ds.in_channels, ds.input_size, ds.flip_mode) == (3, 32, "pixels")
    assert len(ds) == 3 and ds.targets == [0, 0, 1]
    assert [os.path.basename(p) for p, _ in ds.samples] == ["y.jpg", "x.PNG", "a.png"]  # sorted(os.walk(...))
    for i in range(len(ds)):
        x, y = ds[i]
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and isinstance(y, int)
        assert -1 <= x.min() and x.max() <= 1
    assert ds[1][0].eq(-1).all() and ds[2][0].eq(1).all()
    assert ds.verify(progress=False) == []
    # the same labels and order as torchvision's ImageFolder (which has no notion of hidden folders)
    shutil.rmtree(root / ".ipynb_checkpoints")
    reference = ImageFolder(str(root))
    assert ds.class_names == reference.classes and ds.samples == reference.samples


def test_image_folder_skips_corrupt_files_with_a_warning(tmp_path):
    root = make_folder(tmp_path / "imgs", counts=(3, 3), size=40)
    good = (root / "c0" / "img0.png").read_bytes()
    (root / "c0" / "img1.png").write_bytes(good[: len(good) // 2])  # truncated PNG
    (root / "c1" / "img0.jpg").write_bytes(np.random.default_rng(0).bytes(500))  # random bytes named .jpg
    ds = ImageFolderDataset(root, 32)
    assert len(ds) == 7
    with pytest.warns(UnreadableImageWarning, match="unreadable image") as record:
        items = [ds[i] for i in range(len(ds))]
    assert len([w for w in record if w.category is UnreadableImageWarning]) == 2  # once per bad file
    for x, _ in items:
        assert x.shape == (3, 32, 32) and torch.isfinite(x).all() and -1 <= x.min() and x.max() <= 1
    bad = {os.path.basename(p) for p in ds.bad_files}
    assert bad == {"img1.png", "img0.jpg"}
    # deterministic: a bad item is its next readable neighbour, label included; no second warning
    names = [os.path.relpath(p, root) for p, _ in ds.samples]
    i = names.index(os.path.join("c0", "img1.png"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(ds[i][0], ds[i + 1][0]) and ds[i][1] == ds[i + 1][1]
    fresh = ImageFolderDataset(root, 32)
    assert sorted(os.path.basename(p) for p, _ in fresh.verify(progress=False)) == ["img0.jpg", "img1.png"]


def test_image_folder_all_corrupt_is_a_data_error(tmp_path):
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        (tmp_path / c / "x.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    ds = ImageFolderDataset(tmp_path, 16)
    with pytest.warns(UnreadableImageWarning), pytest.raises(DataError, match="none of its 2 image files") as e:
        ds[0]
    assert one_line(str(e.value))
    with pytest.raises(DataError, match="none of its 2"):
        ImageFolderDataset(tmp_path, 16).verify(progress=False)


def test_image_folder_errors_name_the_path(tmp_path):
    with pytest.raises(DataError, match="nope: no such directory") as e:
        ImageFolderDataset(tmp_path / "nope", 32)
    assert one_line(str(e.value))
    (tmp_path / "file.png").write_bytes(b"x")
    with pytest.raises(DataError, match="is a file, not a directory"):
        ImageFolderDataset(tmp_path / "file.png", 32)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no class subfolders"):
        ImageFolderDataset(empty, 32)
    save_image(empty / "loose.png", np.zeros((4, 4, 3)))
    with pytest.raises(DataError, match="1 images directly"):
        ImageFolderDataset(empty, 32)
    (empty / "cls").mkdir()
    (empty / "cls" / "readme.txt").write_text("no images here")
    with pytest.raises(DataError, match="no image files") as e:
        ImageFolderDataset(empty, 32)
    assert str(empty) in str(e.value) and one_line(str(e.value))


def class_counts(ds: ImageFolderDataset) -> dict[str, int]:
    return {name: ds.targets.count(label) for label, name in enumerate(ds.class_names)}


def test_image_folder_links_inside_classes_are_not_followed(tmp_path):
    """A link from one class folder back into the tree filed every dog under "cat" as well (followlinks=True)."""
    root = make_folder(tmp_path / "imgs", counts=(1, 3), size=16)  # c0: 1 image, c1: 3
    (root / "c0" / "loop").symlink_to("../c1")  # back into the tree: another class
    (root / "c1" / "nested" / "up").symlink_to("../..")  # a loop
    outside = make_folder(tmp_path / "elsewhere", counts=(2,), size=16)
    (root / "c1" / "more").symlink_to(outside / "c0")  # out of the tree
    with pytest.warns(SkippedLinkWarning, match="3 folder links inside class folders not followed"):
        ds = ImageFolderDataset(root, 16)
    assert class_counts(ds) == {"c0": 1, "c1": 3}


def test_image_folder_with_two_loops_builds(tmp_path):
    """Two links to their parent in one folder: followed, the walk doubles at every level and never ends."""
    root = make_folder(tmp_path / "imgs", counts=(2, 2), size=16)
    (root / "c0" / "a").symlink_to(".")
    (root / "c0" / "b").symlink_to(".")
    with pytest.warns(SkippedLinkWarning, match="2 folder links"):
        ds = ImageFolderDataset(root, 16)
    assert class_counts(ds) == {"c0": 2, "c1": 2}


def test_image_folder_class_folders_may_be_links_but_not_to_each_other(tmp_path):
    store = make_folder(tmp_path / "store", counts=(2, 3), size=16)
    root = tmp_path / "imgs"
    root.mkdir()
    (root / "cat").symlink_to(store / "c0")
    (root / "dog").symlink_to(store / "c1")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert class_counts(ImageFolderDataset(root, 16)) == {"cat": 2, "dog": 3}
    (root / "wolf").symlink_to(store / "c1" / "nested")
    with pytest.raises(DataError, match="class folder wolf is inside dog") as e:
        ImageFolderDataset(root, 16)
    assert one_line(str(e.value))
    (root / "wolf").unlink()
    (root / "all").symlink_to(root)
    with pytest.raises(DataError, match="class folder all links to the dataset folder itself"):
        ImageFolderDataset(root, 16)


def test_16_bit_greyscale_images_are_scaled_not_white(tmp_path):
    root = tmp_path / "imgs"
    (root / "grey").mkdir(parents=True)
    levels = np.array([[0, 257 * 64], [32896, 65535]], dtype=np.uint16)  # -> 0, 64, 128, 255
    Image.fromarray(np.kron(levels, np.ones((8, 8), np.uint16))).save(root / "grey" / "wide.png")
    with Image.open(root / "grey" / "wide.png") as im:
        assert im.mode.startswith("I")  # PIL reads it as 16-bit greyscale
    x, _ = ImageFolderDataset(root, 16)[0]
    corners = x[0, ::8, ::8]  # [2, 2] in [-1, 1]
    assert torch.equal(corners, to_signed(np.array([[[0], [64]], [[128], [255]]], np.uint8).repeat(3, -1))[0])
    assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])


def test_float_images_are_refused_as_unreadable():
    with pytest.raises(ValueError, match="32-bit float image"):
        to_rgb(Image.fromarray(np.zeros((4, 4), np.float32)))


# --------------------------------------------------------------------------
# CIFAR-10 (a small fake in torchvision's on-disk layout: conftest.write_fake_cifar10)
# --------------------------------------------------------------------------


@pytest.fixture
def no_download(monkeypatch):
    """torchvision's download fails like an offline machine; urlopen too, as a safety net. -> the calls made."""
    import torchvision.datasets.utils

    calls = []

    def offline(*args, **kwargs):
        calls.append(args)
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets.utils, "download_and_extract_archive", offline)
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    return calls


@pytest.fixture
def official_md5s(monkeypatch):
    """Make torchvision's list of official MD5s that of the files in a folder: ``official_md5s(folder)``."""
    from torchvision.datasets import CIFAR10
    from torchvision.datasets.utils import calculate_md5

    def set_md5s(folder):
        md5 = lambda name: calculate_md5(str(folder / name))
        monkeypatch.setattr(CIFAR10, "train_list", [[name, md5(name)] for name, _ in CIFAR10.train_list])
        monkeypatch.setattr(CIFAR10, "test_list", [[name, md5(name)] for name, _ in CIFAR10.test_list])
        monkeypatch.setattr(CIFAR10, "meta", {**CIFAR10.meta, "md5": md5(CIFAR10.meta["filename"])})

    return set_md5s


def not_official(record) -> list[str]:
    return [str(w.message) for w in record if "differ from the official CIFAR-10" in str(w.message)]


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_fake_cifar10_loads_offline(tmp_path, no_download, protocol):
    batches = write_fake_cifar10(tmp_path, protocol=protocol)
    train = [f"data_batch_{i}" for i in range(1, 6)]
    with pytest.warns(UserWarning, match="differ from the official CIFAR-10") as record:
        images, labels, names = load_cifar10_arrays(tmp_path)  # download=True, but the files are there
    assert no_download == [] and len(not_official(record)) == 1  # one warning for the whole copy
    assert images.dtype == np.uint8 and images.shape == (20, 32, 32, 3)
    np.testing.assert_array_equal(images, np.concatenate([batches[b][0] for b in train]))  # R, G, B planes -> HWC
    assert labels.dtype == np.int64 and labels.tolist() == sum((batches[b][1] for b in train), [])
    assert names == CIFAR10_NAMES  # from batches.meta, written as Python 2 strings

    with pytest.warns(UserWarning, match="official"):
        ds = cifar10(root=tmp_path)
    assert isinstance(ds, CIFAR10Dataset) and len(ds) == 20
    assert ds.class_names == CIFAR10_NAMES and ds.num_classes == 10
    assert (ds.in_channels, ds.input_size, ds.flip_mode) == (3, 32, "pixels")
    x, y = ds[5]  # data_batch_2, row 1
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y == batches["data_batch_2"][1][1]
    assert torch.equal(x, to_signed(batches["data_batch_2"][0][1]))
    with pytest.warns(UserWarning, match="official"):
        test = cifar10(root=tmp_path, train=False)
    assert len(test) == 4 and test.targets == batches["test_batch"][1]
    with pytest.warns(UserWarning, match="official"):
        assert len(build_dataset("cifar10", str(tmp_path), 32)) == 20
    assert no_download == []


def test_official_cifar10_loads_without_warning_and_a_tampered_copy_warns(tmp_path, no_download, official_md5s):
    write_fake_cifar10(tmp_path)
    official_md5s(tmp_path / "cifar-10-batches-py")  # as if the fake were the official release
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cifar10(root=tmp_path)
        cifar10(root=tmp_path, train=False)
    write_fake_cifar10(tmp_path / "other", seed=1)  # same layout, other pixels: a valid but different file
    shutil.copy(tmp_path / "other" / "cifar-10-batches-py" / "data_batch_4", tmp_path / "cifar-10-batches-py")
    with pytest.warns(UserWarning) as record:
        cifar10(root=tmp_path)
    assert len(record) == 1 and one_line(str(record[0].message))
    assert re.search(r"cifar-10-batches-py: data_batch_4 differ from the official CIFAR-10", str(record[0].message))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cifar10(root=tmp_path, train=False)  # the test split does not read data_batch_4


def test_cifar10_offline_without_files_is_a_quick_data_error(tmp_path, no_download):
    with pytest.raises(DataError, match="cannot download CIFAR-10 to .*by hand") as e:
        cifar10(root=tmp_path / "cifar")
    assert len(no_download) == 1  # one attempt, no retries: quick
    assert "name resolution" in str(e.value) and one_line(str(e.value))
    with pytest.raises(DataError, match="cannot download CIFAR-10"):
        load_cifar10_arrays(tmp_path / "cifar", train=False)
    with pytest.raises(DataError, match=r"CIFAR-10 not found \(no data_batch_1, .*batches.meta\)") as e:
        cifar10(root=tmp_path / "cifar", download=False)
    assert one_line(str(e.value)) and len(no_download) == 2
    (tmp_path / "file").write_text("")
    with pytest.raises(DataError, match="is a file"):
        cifar10(root=tmp_path / "file")


def test_cifar10_download_runs_with_a_socket_timeout(tmp_path, monkeypatch):
    """urllib waits forever on a dead network unless a default socket timeout is set: the download gets 60 s,
    a timeout the caller set is kept, and the old default comes back afterwards."""
    import socket

    import torchvision.datasets.utils

    seen = []

    def offline(*args, **kwargs):
        seen.append(socket.getdefaulttimeout())
        raise urllib.error.URLError("timed out")

    monkeypatch.setattr(torchvision.datasets.utils, "download_and_extract_archive", offline)
    old = socket.getdefaulttimeout()
    try:
        socket.setdefaulttimeout(None)
        with pytest.raises(DataError, match="cannot download CIFAR-10 .*timed out"):
            cifar10(root=tmp_path / "cifar")
        assert socket.getdefaulttimeout() is None
        socket.setdefaulttimeout(5.0)
        with pytest.raises(DataError, match="cannot download CIFAR-10"):
            cifar10(root=tmp_path / "cifar")
        assert socket.getdefaulttimeout() == 5.0
    finally:
        socket.setdefaulttimeout(old)
    assert seen == [60, 5.0]


def test_cifar10_archive_put_by_hand_is_extracted_offline(tmp_path, monkeypatch):
    """torchvision's real download path: a verified cifar-10-python.tar.gz in root is extracted, nothing fetched."""
    import tarfile

    import torchvision.datasets.utils
    from torchvision.datasets import CIFAR10
    from torchvision.datasets.utils import calculate_md5

    def offline(*args, **kwargs):
        raise AssertionError("no network access expected")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    monkeypatch.setattr(torchvision.datasets.utils, "_urlretrieve", offline)
    batches = write_fake_cifar10(tmp_path / "src")
    root = tmp_path / "cifar"
    root.mkdir()
    with tarfile.open(root / CIFAR10.filename, "w:gz") as tar:
        tar.add(tmp_path / "src" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    monkeypatch.setattr(CIFAR10, "tgz_md5", calculate_md5(str(root / CIFAR10.filename)))
    with pytest.warns(UserWarning, match="official"):
        images, labels, names = load_cifar10_arrays(root, train=False)
    np.testing.assert_array_equal(images, batches["test_batch"][0])
    assert labels.tolist() == batches["test_batch"][1] and names == CIFAR10_NAMES
    assert (root / "cifar-10-batches-py" / "data_batch_5").is_file()


def test_cifar10_damaged_copy_is_a_data_error(tmp_path, no_download):
    write_fake_cifar10(tmp_path)
    folder = tmp_path / "cifar-10-batches-py"
    good = (folder / "data_batch_3").read_bytes()
    for damage, expected in [
        (b"\x80\x04 truncated", "UnpicklingError"),
        (good[: len(good) // 2], "UnpicklingError|EOFError"),
        (pickle.dumps([1, 2, 3]), "holds a list, not a dict"),
        (pickle.dumps({"data": np.zeros((2, 3072), np.float32), "labels": [0, 1]}), r"uint8 data \[N, 3072\]"),
        (pickle.dumps({"data": np.zeros((2, 3072), np.uint8), "labels": [0]}), "expected 2 integer labels"),
        (pickle.dumps({"data": np.zeros((2, 3072), np.uint8), "labels": [0, 10]}), r"labels 0..10 outside 0..9"),
    ]:
        (folder / "data_batch_3").write_bytes(damage)
        with pytest.raises(DataError, match=f"data_batch_3: damaged CIFAR-10 file .*({expected})") as e:
            cifar10(root=tmp_path)
        assert one_line(str(e.value)) and "download it again" in str(e.value)
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": None}))
    with pytest.raises(DataError, match="batches.meta: damaged CIFAR-10 file"):
        cifar10(root=tmp_path, train=False)
    assert no_download == []
    with pytest.raises(UserError, match="32x32"):
        build_dataset("cifar10", str(tmp_path), 64)


class RunsCode:
    """Unpickling this with ``pickle.load`` runs code (a GLOBAL builtins.exec, then REDUCE): it creates ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


@pytest.mark.parametrize("name", ["data_batch_3", "batches.meta"])
def test_cifar10_files_cannot_run_code(tmp_path, no_download, name):
    write_fake_cifar10(tmp_path)
    marker = tmp_path / "ran"
    payload = pickle.dumps({"data": RunsCode(marker), "labels": [0], "label_names": [RunsCode(marker)]}, protocol=2)
    pickle.loads(payload)  # the payload really runs code when unpickled the usual way ...
    assert marker.is_file()
    marker.unlink()
    (tmp_path / "cifar-10-batches-py" / name).write_bytes(payload)
    # (protocol 2 names Python 3's builtins module __builtin__)
    refused = rf"{name}: damaged CIFAR-10 file .*refused to load (__builtin__|builtins).exec"
    with pytest.raises(DataError, match=refused) as e:
        load_cifar10_arrays(tmp_path)
    assert one_line(str(e.value))
    assert not marker.exists()  # ... but not here
    with pytest.raises(DataError, match="refused"):
        cifar10(root=tmp_path)
    assert not marker.exists()


# --------------------------------------------------------------------------
# VAE
# --------------------------------------------------------------------------


def test_vae_load_encode_decode(tiny_vae_dir):
    from minidit.vae import SCALE, decode, downsample_factor, encode, load_vae

    assert SCALE == 0.18215
    vae = load_vae(tiny_vae_dir)
    assert not vae.training and not any(p.requires_grad for p in vae.parameters())
    assert downsample_factor(vae) == 8
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    posterior = vae.encode(x).latent_dist
    mean = encode(vae, x, sample=False)
    assert mean.shape == (2, 4, 4, 4) and mean.dtype == torch.float32
    assert torch.allclose(mean, posterior.mean * 0.18215)
    z1 = encode(vae, x, generator=torch.Generator().manual_seed(1))
    z2 = encode(vae, x, generator=torch.Generator().manual_seed(1))
    assert torch.equal(z1, z2) and not torch.allclose(z1, mean)
    noise = torch.randn(2, 4, 4, 4)
    assert torch.allclose(encode(vae, x, noise=noise), (posterior.mean + posterior.std * noise) * 0.18215)
    images = decode(vae, mean)
    assert images.shape == (2, 3, 32, 32) and images.dtype == torch.float32
    assert torch.allclose(images, vae.decode(mean / 0.18215).sample)


def test_vae_load_errors_are_one_line(tmp_path, monkeypatch):
    from diffusers import AutoencoderKL

    from minidit.vae import VAE_IDS, load_vae, resolve_vae

    assert resolve_vae("ema") == (VAE_IDS["ema"], None) and VAE_IDS["mse"] == "stabilityai/sd-vae-ft-mse"
    with pytest.raises(UserError, match="no such directory"):
        load_vae(tmp_path / "missing_vae")

    calls = []

    def offline(*args, **kwargs):
        calls.append(kwargs.get("local_files_only", False))
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files.\nCheck your connection.")

    monkeypatch.setattr(AutoencoderKL, "from_pretrained", offline)
    with pytest.raises(UserError, match="could not load the VAE 'stabilityai/sd-vae-ft-ema'.*directory") as e:
        load_vae("ema")
    assert one_line(str(e.value))
    assert calls == [True, False]  # the local cache first, then the hub


# --------------------------------------------------------------------------
# extract_latents and LatentShards
# --------------------------------------------------------------------------


def extract(data, out, vae_dir, *extra):
    from minidit.extract_latents import main

    argv = ["--data-path", str(data), "--out", str(out), "--image-size", "64", "--vae", str(vae_dir)]
    argv += ["--shard-size", "4", "--device", "cpu", "--num-workers", "0", *extra]
    return run_cli(main, argv)


def shard_tensors(out):
    from safetensors.torch import load_file

    return {p.name: load_file(p) for p in sorted(out.glob("shard_*.safetensors"))}


def test_extract_latents_end_to_end(tmp_path, tiny_vae_dir, capsys):
    from minidit.vae import encode, load_vae

    data = make_folder(tmp_path / "imgs")
    out = tmp_path / "latents" / "tiny"
    assert extract(data, out, tiny_vae_dir, "--flip", "--mean", "--batch-size", "3") == 0
    assert "wrote 10 latents in 3 shards" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == [
        "meta.json",
        "shard_00000.safetensors",
        "shard_00001.safetensors",
        "shard_00002.safetensors",
    ]
    meta = json.loads((out / "meta.json").read_text())
    assert meta["complete"] and meta["num_images"] == 10 and meta["latent_shape"] == [4, 8, 8]
    assert meta["class_names"] == ["c0", "c1", "c2"] and meta["flip"] and meta["scale"] == 0.18215
    assert (meta["image_size"], meta["shard_size"], meta["dtype"], meta["posterior"]) == (64, 4, "float16", "mean")
    tensors = shard_tensors(out)
    assert tensors["shard_00002.safetensors"]["latents"].shape == (2, 4, 8, 8)
    assert tensors["shard_00000.safetensors"]["latents"].dtype == torch.float16

    images = ImageFolderDataset(data, 64)
    ds = LatentShards(out)
    assert len(ds) == 10 and ds.targets.tolist() == images.targets == [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert (ds.num_classes, ds.class_names, ds.in_channels, ds.input_size) == (3, ["c0", "c1", "c2"], 4, 8)
    assert ds.flip_mode == "stored"
    vae = load_vae(tiny_vae_dir)
    pixels = torch.stack([images[i][0] for i in range(10)])
    mean, mean_flipped = encode(vae, pixels, sample=False), encode(vae, pixels.flip(-1), sample=False)
    assert not torch.allclose(mean_flipped, mean.flip(-1), atol=1e-3)  # the VAE is not flip-equivariant
    for i in range(10):
        x, y = ds[i]
        assert x.shape == (2, 4, 8, 8) and x.dtype == torch.float32 and y == images.targets[i]
        # float16 storage: relative rounding <= 2^-11
        torch.testing.assert_close(x[0], mean[i], rtol=2e-3, atol=1e-4)
        torch.testing.assert_close(x[1], mean_flipped[i], rtol=2e-3, atol=1e-4)
    # with workers: each opens its own shard handles
    loader = torch.utils.data.DataLoader(ds, batch_size=5, num_workers=2)
    xs, ys = zip(*loader)
    assert torch.equal(torch.cat(xs), torch.stack([ds[i][0] for i in range(10)]))
    assert torch.cat(ys).tolist() == images.targets
    assert isinstance(build_dataset("latents", str(out), 64), LatentShards)
    with pytest.raises(UserError, match="extracted from 64px"):
        build_dataset("latents", str(out), 128)


def test_extract_latents_samples_are_deterministic_per_shard(tmp_path, tiny_vae_dir):
    data = make_folder(tmp_path / "imgs", counts=(5, 4))
    common = ("--posterior", "sample", "--flip", "--dtype", "float32")
    assert extract(data, tmp_path / "a", tiny_vae_dir, *common, "--batch-size", "2") == 0
    assert extract(data, tmp_path / "b", tiny_vae_dir, *common, "--batch-size", "9") == 0
    assert extract(data, tmp_path / "c", tiny_vae_dir, *common, "--batch-size", "4", "--seed", "1") == 0
    assert extract(data, tmp_path / "m", tiny_vae_dir, *common[2:], "--mean") == 0
    a, b, c, m = (shard_tensors(tmp_path / d) for d in "abcm")
    for name in a:
        for key in ("latents", "latents_flip"):
            torch.testing.assert_close(a[name][key], b[name][key], rtol=1e-5, atol=1e-6)  # batch size is irrelevant
            assert not torch.allclose(a[name][key], c[name][key])  # the seed matters
            assert not torch.allclose(a[name][key], m[name][key])  # a sample, not the mean


def test_extract_latents_resumes_only_missing_shards(tmp_path, tiny_vae_dir, capsys):
    data = make_folder(tmp_path / "imgs")
    out = tmp_path / "lat"
    assert extract(data, out, tiny_vae_dir, "--flip") == 0
    before = shard_tensors(out)
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("shard_*")}
    (out / "shard_00001.safetensors").unlink()
    with pytest.raises(DataError, match="shard_00001.safetensors is missing.*rerun python -m minidit.extract_latents"):
        LatentShards(out)
    time.sleep(0.01)
    capsys.readouterr()
    assert extract(data, out, tiny_vae_dir, "--flip") == 0
    assert "(1 encoded now)" in capsys.readouterr().out
    after = shard_tensors(out)
    assert sorted(after) == sorted(before)
    for name in before:
        for key in before[name]:
            assert torch.equal(before[name][key], after[name][key]), (name, key)
    new_mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("shard_*")}
    assert new_mtimes["shard_00001.safetensors"] != mtimes["shard_00001.safetensors"]
    assert {k: v for k, v in new_mtimes.items() if k != "shard_00001.safetensors"} == {
        k: v for k, v in mtimes.items() if k != "shard_00001.safetensors"
    }
    # a complete extraction is left alone
    assert extract(data, out, tiny_vae_dir, "--flip") == 0
    assert "nothing to do" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("shard_*")} == new_mtimes


def test_interrupted_extraction_is_detected_and_finished(tmp_path, tiny_vae_dir, monkeypatch, capsys):
    import minidit.extract_latents as ex

    data = make_folder(tmp_path / "imgs")
    out = tmp_path / "lat"
    real_write, written = ex._write_shard, []

    def write_then_interrupt(*args, **kwargs):
        if written:
            raise KeyboardInterrupt
        written.append(args[0])
        return real_write(*args, **kwargs)

    monkeypatch.setattr(ex, "_write_shard", write_then_interrupt)
    assert extract(data, out, tiny_vae_dir) == 130
    assert not json.loads((out / "meta.json").read_text())["complete"]
    with pytest.raises(DataError, match="incomplete latents extraction.*rerun") as e:
        LatentShards(out)
    assert one_line(str(e.value))
    monkeypatch.setattr(ex, "_write_shard", real_write)
    assert extract(data, out, tiny_vae_dir) == 0
    assert "(2 encoded now)" in capsys.readouterr().out
    assert len(LatentShards(out)) == 10 and LatentShards(out).posterior == "moments"  # the default


def test_extract_latents_refuses_other_settings_and_bad_input(tmp_path, tiny_vae_dir, capsys):
    from minidit.extract_latents import main

    data = make_folder(tmp_path / "imgs")
    out = tmp_path / "lat"
    assert extract(data, out, tiny_vae_dir, "--flip") == 0
    capsys.readouterr()
    argv = ["--data-path", str(data), "--out", str(out), "--image-size", "32", "--vae", str(tiny_vae_dir)]
    argv += ["--shard-size", "4", "--device", "cpu", "--num-workers", "0", "--posterior", "sample"]
    assert run_cli(main, argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert "different settings" in err and "image_size: 64 there, 32 now" in err and "flip: true there" in err
    assert 'posterior: "moments" there, "sample" now' in err
    assert extract(tmp_path / "missing", tmp_path / "x", tiny_vae_dir) == 2
    assert "missing: no such directory" in capsys.readouterr().err
    assert extract(data, tmp_path / "y", tmp_path / "no_vae") == 2
    assert "no such directory" in capsys.readouterr().err
    assert extract(data, tmp_path / "z", tiny_vae_dir, "--image-size", "60") == 2  # last --image-size wins
    assert "multiple of 8" in capsys.readouterr().err


def test_extract_latents_replaces_unreadable_images(tmp_path, tiny_vae_dir):
    data = make_folder(tmp_path / "imgs", counts=(3, 2))
    (data / "c1" / "img0.png").write_bytes(b"not a png")
    out = tmp_path / "lat"
    with pytest.warns(UnreadableImageWarning):
        assert extract(data, out, tiny_vae_dir) == 0
    assert json.loads((out / "meta.json").read_text())["substituted"] == [os.path.join("c1", "img0.png")]
    assert len(LatentShards(out)) == 5


def test_latent_shards_errors(tmp_path):
    with pytest.raises(DataError, match="no such directory"):
        LatentShards(tmp_path / "nope")
    with pytest.raises(DataError, match="meta.json: missing.*extract_latents") as e:
        LatentShards(tmp_path)
    assert one_line(str(e.value))
    (tmp_path / "meta.json").write_text("{not json")
    with pytest.raises(DataError, match="not readable JSON"):
        LatentShards(tmp_path)


def test_build_dataset_dispatch(tmp_path):
    root = make_folder(tmp_path / "imgs", counts=(2, 1), size=20)
    ds = build_dataset("folder", str(root), 16)
    assert isinstance(ds, ImageFolderDataset) and ds[0][0].shape == (3, 16, 16)
    with pytest.raises(UserError, match="needs a data path"):
        build_dataset("folder", None, 16)
    with pytest.raises(UserError, match="needs a data path"):
        build_dataset("latents", None, 16)
    with pytest.raises(UserError, match="unknown dataset kind 'toyish'"):
        build_dataset("toyish", None, 16)


def test_cli_shows_a_skipped_image_as_one_warning_line(tmp_path):
    """Under a command-line entry point (``run_cli``) a skipped file is one ``warning:`` line, no source echo."""
    root = tmp_path / "imgs"
    save_image(root / "c0" / "ok.png", random_image(np.random.default_rng(0), 40, 40))
    (root / "c0" / "zbad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    script = (
        "import sys, warnings\n"
        "from minidit.data import ImageFolderDataset\n"
        "from minidit.errors import run_cli\n"
        "def main(argv):\n"
        "    ds = ImageFolderDataset(sys.argv[1], 32)\n"
        "    items = [ds[i] for i in range(len(ds))]\n"
        "    warnings.warn('not ours')\n"  # other packages' warnings keep their usual format
        "sys.exit(run_cli(main, []))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, str(root)], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.strip().splitlines()
    ours = [line for line in lines if "zbad.png" in line]
    assert len(ours) == 1 and ours[0].startswith("warning: ") and "1 unreadable files so far" in ours[0], lines
    assert not any("items = " in line for line in lines), "the warning echoed a source line"
    assert any("UserWarning: not ours" in line for line in lines), lines
