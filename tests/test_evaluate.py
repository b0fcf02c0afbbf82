"""minidit.evaluate: the Fréchet maths, feature statistics, FID plumbing (npz, folders, CIFAR-10, caching),
toy metrics and the command line, all offline with small injected networks instead of InceptionV3."""

import ast
import os
import re
import socket
import subprocess
import sys
import types
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import write_fake_cifar10
from PIL import Image
from scipy import linalg

from minidit import evaluate
from minidit.data import load_cifar10_arrays
from minidit.errors import UserError, run_cli

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------


class TinyExtractor(torch.nn.Module):
    """A fixed random conv + global mean/max pool: uint8 [B, 3, H, W] -> float [B, 32]. Counts its calls."""

    name = "tiny-test"

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = torch.nn.Conv2d(3, 16, 3, stride=2)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.dtype == torch.uint8 and x.dim() == 4 and x.shape[1] == 3
        self.calls += 1
        h = F.relu(self.conv(x.float() / 127.5 - 1))
        return torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1)


def random_images(n: int, size: int = 16, seed: int = 0) -> np.ndarray:
    """uint8 [n, size, size, 3]: smooth random blobs (upsampled noise), so features vary between images."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 4, generator=g)
    x = F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
    return (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def save_npz(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


def write_folder(folder: Path, images: np.ndarray) -> Path:
    """PNG files in two nested subfolders, named so that sorting by path keeps the array's order."""
    for i, im in enumerate(images):
        sub = folder / ("a" if i < len(images) // 2 else "b") / "deeper"
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(im).save(sub / f"{i:05d}.png")
    return folder


def random_spd(f: int, seed: int) -> np.ndarray:
    a = np.random.default_rng(seed).standard_normal((f, 2 * f))
    return a @ a.T / (2 * f) + 0.1 * np.eye(f)


def direct_fid(a: np.ndarray, b: np.ndarray, extractor) -> float:
    """FID computed the long way, straight from the extractor, for comparison."""
    with torch.no_grad():
        fa = extractor(torch.from_numpy(a).permute(0, 3, 1, 2)).double().numpy()
        fb = extractor(torch.from_numpy(b).permute(0, 3, 1, 2)).double().numpy()
    return evaluate.frechet_distance(fa.mean(0), np.cov(fa, rowvar=False), fb.mean(0), np.cov(fb, rowvar=False))


def cli(argv, capsys):
    """Run the command line in-process -> (exit code, stdout, stderr)."""
    code = run_cli(evaluate.main, [str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


# --------------------------------------------------------------------------
# The Fréchet distance and statistics
# --------------------------------------------------------------------------


def test_frechet_matches_an_independent_eigenvalue_computation():
    f = 24
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.standard_normal(f), rng.standard_normal(f)
    s1, s2 = random_spd(f, 2), random_spd(f, 3)
    # Tr sqrt(s1 s2) = sum of sqrt eigenvalues of the symmetric s1^1/2 s2 s1^1/2 (same spectrum).
    w, v = linalg.eigh(s1)
    s1_half = (v * np.sqrt(w)) @ v.T
    tr_sqrt = np.sqrt(np.clip(linalg.eigvalsh(s1_half @ s2 @ s1_half), 0, None)).sum()
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
    assert evaluate.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)
    assert evaluate.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(evaluate.frechet_distance(mu2, s2, mu1, s1))


def test_frechet_closed_form_for_diagonal_covariances():
    rng = np.random.default_rng(4)
    a, b = rng.uniform(0.1, 3, 10), rng.uniform(0.1, 3, 10)
    mu1, mu2 = rng.standard_normal(10), rng.standard_normal(10)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert evaluate.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)


def test_identical_sets_give_zero_and_shifted_sets_give_the_squared_shift():
    x = np.random.default_rng(5).standard_normal((500, 16)) @ np.random.default_rng(6).standard_normal((16, 16))
    mu, sigma = evaluate.feature_statistics(x)
    assert abs(evaluate.frechet_distance(mu, sigma, mu, sigma)) < 1e-8
    shift = np.linspace(-1, 2, 16)
    mu2, sigma2 = evaluate.feature_statistics(x + shift)
    assert evaluate.frechet_distance(mu, sigma, mu2, sigma2) == pytest.approx(np.sum(shift**2), rel=1e-8)


def test_frechet_survives_singular_covariances():
    """Fewer samples than features: rank-deficient covariances (the standard evaluators' edge case)."""
    x = np.random.default_rng(7).standard_normal((10, 40))
    mu, sigma = evaluate.feature_statistics(x)
    # sqrtm leaves ~sqrt(machine eps) on the 30 zero eigenvalues: near 0 relative to Tr(sigma) = 40.
    assert abs(evaluate.frechet_distance(mu, sigma, mu, sigma)) < 1e-5
    y = np.random.default_rng(8).standard_normal((10, 40))
    d = evaluate.frechet_distance(mu, sigma, *evaluate.feature_statistics(y))
    assert np.isfinite(d) and d > 0


def test_feature_statistics_match_numpy():
    x = np.random.default_rng(9).standard_normal((50, 7)).astype(np.float32)
    mu, sigma = evaluate.feature_statistics(x)
    assert mu.dtype == sigma.dtype == np.float64 and mu.shape == (7,) and sigma.shape == (7, 7)
    np.testing.assert_allclose(mu, x.astype(np.float64).mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(x.astype(np.float64), rowvar=False), rtol=1e-12)


def test_compute_features_accepts_arrays_tensors_and_batch_iterables():
    extractor, images = TinyExtractor(), random_images(10)
    a = evaluate.compute_features(images, extractor, batch_size=4, device="cpu", progress=False)
    assert a.shape == (10, 32) and a.dtype == np.float64 and extractor.calls == 3
    b = evaluate.compute_features(torch.from_numpy(images).permute(0, 3, 1, 2), extractor, 3, "cpu", progress=False)
    c = evaluate.compute_features(iter([images[:7], images[7:]]), extractor, device="cpu", progress=False)
    d = evaluate.compute_features(images, lambda x: (extractor(x),), device="cpu", progress=False)  # torch-fidelity
    for other in (b, c, d):
        np.testing.assert_allclose(other, a, rtol=1e-6, atol=1e-6)
    with pytest.raises(UserError, match="uint8"):
        evaluate.compute_features(images.astype(np.float32), extractor, device="cpu", progress=False)


# --------------------------------------------------------------------------
# FID with an injected extractor: npz, folders, caching
# --------------------------------------------------------------------------


def test_fid_npz_vs_npz(tmp_path):
    extractor = TinyExtractor()
    samples, real = random_images(64, seed=1), random_images(80, seed=2)
    s = save_npz(tmp_path / "samples.npz", arr_0=samples, labels=np.zeros(64, np.int64))
    r = save_npz(tmp_path / "real.npz", arr_0=real)
    kwargs = dict(extractor=extractor, device="cpu", cache=False, progress=False)
    value = evaluate.fid(s, r, **kwargs)
    assert value == pytest.approx(direct_fid(samples, real, extractor), rel=1e-6)
    assert value > 0.01
    assert (value.n_samples, value.reference.n, value.extractor) == (64, 80, "tiny-test")  # what was compared
    assert abs(evaluate.fid(s, s, **kwargs)) < 1e-6


def test_fid_folder_vs_npz(tmp_path):
    extractor, images = TinyExtractor(), random_images(40, seed=3)
    folder = write_folder(tmp_path / "pngs", images)
    np.testing.assert_array_equal(evaluate.load_images(folder), images)  # PNG is lossless, order kept
    r = save_npz(tmp_path / "same.npz", arr_0=images)
    kwargs = dict(extractor=extractor, device="cpu", batch_size=16, cache=False, progress=False)
    assert abs(evaluate.fid(folder, r, **kwargs)) < 1e-6
    other = save_npz(tmp_path / "other.npz", arr_0=random_images(40, seed=4))
    assert evaluate.fid(folder, other, **kwargs) == pytest.approx(evaluate.fid(r, other, **kwargs), rel=1e-6)


def test_reference_statistics_are_cached(tmp_path):
    extractor = TinyExtractor()
    real = save_npz(tmp_path / "real.npz", arr_0=random_images(50, seed=5))
    kwargs = dict(cache_dir=tmp_path / "stats", device="cpu", batch_size=16, progress=False)
    mu, sigma = evaluate.reference_statistics(real, extractor, **kwargs)
    calls = extractor.calls
    assert calls == 4
    (cached,) = (tmp_path / "stats").glob("*.npz")
    assert "real" in cached.name and "tiny-test" in cached.name
    stats = evaluate.reference_statistics(real, extractor, **kwargs)
    assert extractor.calls == calls  # read back, not recomputed
    assert (stats.n, stats.label, stats.extractor) == (50, "real", "tiny-test")  # and it says what it is
    mu2, sigma2 = stats
    np.testing.assert_array_equal(mu, mu2)
    np.testing.assert_array_equal(sigma, sigma2)
    # Another extractor does not reuse these statistics.
    other = TinyExtractor(seed=1)
    other.name = "tiny-other"
    evaluate.reference_statistics(real, other, **kwargs)
    assert other.calls == 4 and len(list((tmp_path / "stats").glob("*.npz"))) == 2
    # Changed images invalidate the cache.
    save_npz(real, arr_0=random_images(50, seed=6))
    mu3, _ = evaluate.reference_statistics(real, extractor, **kwargs)
    assert extractor.calls == 2 * calls and not np.allclose(mu3, mu)
    # A statistics file (our cache format) is a reference too; FID against it = FID against the images.
    samples = save_npz(tmp_path / "samples.npz", arr_0=random_images(30, seed=7))
    via_images = evaluate.fid(samples, real, extractor, device="cpu", cache=False, progress=False)
    latest = max((tmp_path / "stats").glob("*.npz"), key=lambda p: p.stat().st_mtime_ns)
    assert evaluate.fid(samples, latest, extractor, device="cpu", progress=False) == pytest.approx(via_images)


# --------------------------------------------------------------------------
# FID against CIFAR-10 (a fake local copy in torchvision's layout)
# --------------------------------------------------------------------------


def test_cli_fid_against_cifar10(tmp_path, monkeypatch, capsys):
    """The CIFAR-10 reference is read by minidit.data (tested in test_data.py): its 50k training images."""
    batches = write_fake_cifar10(tmp_path / "cifar", per_batch=8)
    train = np.concatenate([batches[f"data_batch_{i}"][0] for i in range(1, 6)])
    with pytest.warns(UserWarning, match="differ from the official CIFAR-10"):
        np.testing.assert_array_equal(load_cifar10_arrays(tmp_path / "cifar", download=False)[0], train)
    extractor = TinyExtractor()
    monkeypatch.setattr(evaluate, "inception_extractor", lambda device=None: extractor)
    samples = random_images(36, size=32, seed=13)
    s = save_npz(tmp_path / "samples.npz", arr_0=samples)
    argv = ["fid", s, "--ref", "cifar10", "--data-root", tmp_path / "cifar", "--cache-dir", tmp_path / "stats"]
    with pytest.warns(UserWarning, match="official"):
        code, out, err = cli([*argv, "--device", "cpu", "--no-progress"], capsys)
    assert code == 0, err
    expected = direct_fid(samples, train, extractor)
    assert out.startswith(f"FID: {expected:.2f} (36 samples vs reference cifar10-train, 40 images")
    assert len(list((tmp_path / "stats").glob("cifar10-train-*-tiny-test.npz"))) == 1
    # `stats` writes the same statistics; FID against that file is the same number.
    stats = tmp_path / "cifar_stats.npz"
    with pytest.warns(UserWarning, match="official"):
        code, out, err = cli(["stats", "cifar10", "--out", stats, "--data-root", tmp_path / "cifar"], capsys)
    assert code == 0, err
    assert out.startswith(f"wrote {stats}: mu [32], sigma [32, 32] from 40 images")
    code, out, err = cli(["fid", s, "--ref", stats, "--no-progress", "--device", "cpu"], capsys)
    assert code == 0 and out.startswith(f"FID: {expected:.2f} (36 samples"), err


# --------------------------------------------------------------------------
# torch-fidelity's InceptionV3, offline
# --------------------------------------------------------------------------


def test_missing_torch_fidelity_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)
    monkeypatch.setitem(sys.modules, "torch_fidelity.feature_extractor_inceptionv3", None)
    with pytest.raises(UserError, match="pip install 'torch-fidelity"):
        evaluate.inception_extractor("cpu")


def test_inception_weights_unavailable_offline(tmp_path, monkeypatch):
    tf = pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3")

    def offline(url, *args, **kwargs):  # what torch.hub raises with no network
        raise urllib.error.URLError(socket.gaierror(-2, "Name or service not known"))

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    monkeypatch.setattr(tf, "load_state_dict_from_url", offline)  # in case torch-fidelity tried itself
    expected = tmp_path / "torch" / "hub" / "checkpoints" / "weights-inception-2015-12-05-6726825d.pth"
    assert evaluate.inception_weights_path() == expected
    with pytest.raises(UserError) as e:
        evaluate.inception_extractor("cpu")
    message = str(e.value)
    assert "offline" in message and str(expected) in message and tf.URL_INCEPTION_V3 in message
    assert "\n" not in message

    # A damaged cached file: say which, and to delete it.
    expected.parent.mkdir(parents=True, exist_ok=True)
    expected.write_bytes(b"not a checkpoint")

    def damaged(url, *args, **kwargs):
        raise RuntimeError("PytorchStreamReader failed reading zip archive: failed finding central directory")

    monkeypatch.setattr(tf, "load_state_dict_from_url", damaged)
    with pytest.raises(UserError, match="unreadable.*delete"):
        evaluate.inception_extractor("cpu")


class RunsCode:
    """Unpickling this with ``pickle.load`` (or ``torch.load(weights_only=False)``) creates ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


def test_tampered_inception_weights_are_refused_before_torch_fidelity_unpickles_them(tmp_path, monkeypatch):
    """torch-fidelity loads its cached weights with torch.load(weights_only=False): minidit reads the file
    safely first, so a file that would run code is one line and runs nothing."""
    pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    path = evaluate.inception_weights_path()
    path.parent.mkdir(parents=True)
    marker = tmp_path / "ran"
    torch.save({"Conv2d_1a_3x3.conv.weight": RunsCode(marker)}, path)
    torch.load(path, weights_only=False)  # the payload is live: an unsafe load runs it ...
    assert marker.is_file()
    marker.unlink()
    with pytest.raises(UserError) as e:
        evaluate.inception_extractor("cpu")
    assert not marker.exists()  # ... but not here
    message = str(e.value)
    assert f"{path} are unreadable (refused" in message and "exec" in message and "delete" in message, message
    assert "\n" not in message


# --------------------------------------------------------------------------
# Toy metrics with a stub classifier
# --------------------------------------------------------------------------


class MeanValueClassifier(torch.nn.Module):
    """Class k <=> the image's mean value lies in [-1 + 0.2 k, -0.8 + 0.2 k). Features: per-channel mean and
    std, and 2x2-pooled means: [N, 3 + 3 + 12]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = ((x.mean(dim=(1, 2, 3)) + 1) * 5).floor().clamp(0, 9).long()
        return F.one_hot(k, 10).float() * 10

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3)), F.adaptive_avg_pool2d(x, 2).flatten(1)], dim=1)


def toy_samples(n: int = 40, size: int = 16):
    """Images whose mean sits at the centre of class i % 10's bin; labels with three deliberate misses."""
    g = torch.Generator().manual_seed(0)
    drawn = torch.arange(n) % 10
    images = (-0.9 + 0.2 * drawn).view(n, 1, 1, 1) + 0.02 * torch.randn(n, 3, size, size, generator=g)
    labels = drawn.clone()
    labels[[3, 17, 25]] = (labels[[3, 17, 25]] + 1) % 10  # asked for class c + 1, drew class c
    return images, labels, drawn


def test_toy_metrics_with_a_stub_classifier():
    images, labels, _ = toy_samples()
    m = evaluate.toy_metrics(images, labels, MeanValueClassifier(), real_images=images)
    assert m["accuracy"] == pytest.approx(37 / 40)
    # Asked for 4, 6, 8: four right, plus one image of class 3, 5, 7 that was meant to be the next class.
    assert m["per_class_accuracy"] == pytest.approx([0.8 if c in (4, 6, 8) else 1.0 for c in range(10)])
    assert abs(m["frechet_toy"]) < 1e-6 and m["num_samples"] == m["num_real"] == 40
    few = evaluate.toy_metrics(images[:9], labels[:9], MeanValueClassifier(), real_images=images)
    assert [c for c, a in enumerate(few["per_class_accuracy"]) if a != a] == [3, 9]  # no samples: NaN
    # Real images brighter by 0.1: the 15 mean features move by 0.1, the stds do not.
    shifted = evaluate.toy_metrics(images, labels, MeanValueClassifier(), real_images=images + 0.1)
    assert shifted["frechet_toy"] == pytest.approx(15 * 0.1**2, rel=1e-6)
    # uint8 [N, H, W, 3] samples, as the samplers write them: same verdicts.
    as_uint8 = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    m8 = evaluate.toy_metrics(as_uint8, labels.numpy(), MeanValueClassifier(), real_images=images)
    assert m8["accuracy"] == m["accuracy"] and m8["frechet_toy"] < 1e-3


def test_toy_metrics_defaults_come_from_minidit_toy_lazily(monkeypatch):
    images, labels, _ = toy_samples()
    asked = []

    def make_batch(indices, seed=0, image_size=32):
        asked.append((indices.clone(), seed, image_size))
        return images[indices - 10**6], labels[indices - 10**6]

    fake_toy = types.SimpleNamespace(load_classifier=lambda path=None: MeanValueClassifier(), make_batch=make_batch)
    monkeypatch.setitem(sys.modules, "minidit.toy", fake_toy)
    m = evaluate.toy_metrics(images, labels, batch_size=16)
    assert torch.equal(torch.cat([a[0] for a in asked]), torch.arange(10**6, 10**6 + 40))
    assert {(seed, size) for _, seed, size in asked} == {(12345, 16)}
    assert m["accuracy"] == pytest.approx(37 / 40) and abs(m["frechet_toy"]) < 1e-6


def fake_toy_module(monkeypatch, images, labels):
    fake_toy = types.SimpleNamespace(
        load_classifier=lambda path=None: MeanValueClassifier(),
        make_batch=lambda indices, seed=0, image_size=32: (images[indices - 10**6], labels[indices - 10**6]),
        CLASS_NAMES=[f"shape {c}" for c in range(10)],
    )
    monkeypatch.setitem(sys.modules, "minidit.toy", fake_toy)


def test_cli_toy(tmp_path, monkeypatch, capsys):
    images, labels, _ = toy_samples(size=8)
    as_uint8 = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    fake_toy_module(monkeypatch, images, labels)
    s = save_npz(tmp_path / "toy.npz", arr_0=as_uint8, labels=labels.numpy())
    code, out, err = cli(["toy", s], capsys)
    assert code == 0, err
    assert "accuracy: 92.50% (40 samples)" in out and "Frechet-toy: 0.0000 (vs 40 real toy images)" in out
    assert (
        "per-class accuracy: shape 0: 100.0%, shape 1: 100.0%, shape 2: 100.0%, shape 3: 100.0%, shape 4: 80.0%" in out
    )
    assert err == ""  # 40 images for 18 features: no note


def test_cli_toy_with_few_samples_says_the_frechet_figure_is_unreliable(tmp_path, monkeypatch, capsys, recwarn):
    images, labels, _ = toy_samples(size=8)
    images, labels = images[:12], labels[:12]
    as_uint8 = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    fake_toy_module(monkeypatch, images, labels)
    code, out, err = cli(["toy", save_npz(tmp_path / "toy.npz", arr_0=as_uint8, labels=labels.numpy())], capsys)
    assert code == 0 and "(12 samples)" in out, err
    assert err.strip() == (
        "note: Frechet-toy is unreliable with no more images than the classifier's 18 features: "
        "use more than 18 samples (and --n-real)"
    )
    assert not [w for w in recwarn if issubclass(w.category, linalg.LinAlgWarning)]  # scipy's own: not shown


# --------------------------------------------------------------------------
# The command line: bad input is one line and exit status 2
# --------------------------------------------------------------------------


def bad_inputs(tmp_path: Path) -> dict[str, tuple[list, str]]:
    good = save_npz(tmp_path / "good.npz", arr_0=random_images(4))
    (tmp_path / "empty").mkdir()
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("no images here")
    return {
        "missing samples": (["fid", tmp_path / "nope.npz", "--ref", good], "nope.npz: no such file"),
        "no arr_0": (["fid", save_npz(tmp_path / "x.npz", images=random_images(4)), "--ref", good], "no 'arr_0'"),
        "float images": (["fid", save_npz(tmp_path / "f.npz", arr_0=np.zeros((4, 8, 8, 3))), "--ref", good], "uint8"),
        "channels first": (
            ["fid", save_npz(tmp_path / "c.npz", arr_0=np.zeros((4, 3, 8, 8), np.uint8)), "--ref", good],
            r"\[N, H, W, 3\]",
        ),  # fmt: skip
        "grayscale": (
            ["fid", save_npz(tmp_path / "g.npz", arr_0=np.zeros((4, 8, 8), np.uint8)), "--ref", good],
            "shape",
        ),  # fmt: skip
        "empty folder": (["fid", tmp_path / "empty", "--ref", good], "no images"),
        "folder of no images": (["fid", tmp_path / "junk", "--ref", good], "no images"),
        "unknown ref": (["fid", good, "--ref", "imagenet"], "unknown --ref 'imagenet'"),
        "ref without images": (["fid", good, "--ref", save_npz(tmp_path / "r.npz", foo=np.zeros(3))], "neither"),
        "not an npz": (["fid", good, "--ref", tmp_path / "junk" / "notes.txt"], "a reference is"),
        "toy without labels": (["toy", good], "no 'labels'"),
        "stats missing source": (["stats", tmp_path / "nope", "--out", tmp_path / "s.npz"], "no such"),
        "bad batch size": (["fid", good, "--ref", good, "--batch-size", "0"], "at least 1"),
        "misspelled option": (["fid", good, "--ref", good, "--batchsize", "8"], r"did you mean --batch-size\?"),
        "no command": ([], "required"),
    }


def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(evaluate, "inception_extractor", lambda device=None: TinyExtractor())
    for case, (argv, expected) in bad_inputs(tmp_path).items():
        code, out, err = cli([*argv, *(["--device", "cpu"] if argv else [])], capsys)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (case, err)
        assert re.search(expected, lines[0]), (case, lines[0])


def test_python_m_minidit_evaluate(tmp_path):
    """The real entry point: a bad input exits 2 with one line on stderr, no traceback."""
    run = subprocess.run(
        [sys.executable, "-m", "minidit.evaluate", "fid", "missing.npz", "--ref", "cifar10"],
        capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert run.returncode == 2 and run.stderr.strip() == "error: missing.npz: no such file or folder", run.stderr


def test_optional_dependencies_are_imported_lazily():
    """torch-fidelity, scipy and minidit.toy (written separately) are imported inside functions, not at the top."""
    tree = ast.parse((ROOT / "minidit" / "evaluate.py").read_text())
    top = {alias.name for node in tree.body if isinstance(node, ast.Import) for alias in node.names}
    top |= {f"{'.' * node.level}{node.module}" for node in tree.body if isinstance(node, ast.ImportFrom)}
    assert not {name for name in top if name.split(".")[0] in ("torch_fidelity", "scipy") or "toy" in name}, top
