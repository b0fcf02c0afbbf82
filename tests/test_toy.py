"""Tests of minidit.toy: the procedural toy-shapes dataset and its shipped classifier.

The dataset is checked against independent facts (a pure-Python splitmix64, the analytic areas of the
shapes, the colours they should have), not against itself; the classifier against fresh data it never saw.
"""

from __future__ import annotations

import math

import pytest
import torch

from minidit import toy
from minidit.errors import UserError, run_cli

MASK64 = (1 << 64) - 1


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These tests run many small tensor ops, for which a second thread only adds synchronisation:
    on a 2-core machine shared with other work they take about 3 s on one thread and up to 3x as long on two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def splitmix64_reference(seed: int, index: int, k: int) -> int:
    """The k-th (1-based) output of splitmix64 seeded with mix64(index ^ mix64(seed)), in plain Python ints."""

    def mix64(z: int) -> int:
        z &= MASK64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
        return z ^ (z >> 31)

    state = mix64((index & MASK64) ^ mix64(seed))
    return mix64(state + k * 0x9E3779B97F4A7C15)


# --------------------------------------------------------------------------
# Determinism
# --------------------------------------------------------------------------


def test_hash_is_splitmix64_despite_int64_wraparound():
    # Negative indices and seeds, and values near the int64 limits, exercise the signed-overflow and
    # arithmetic-shift pitfalls of doing uint64 arithmetic with int64 tensors.
    indices = [0, 1, 2, 12345, -1, -(2**63), 2**63 - 1, 2**40 + 17]
    for seed in (0, 7, -3, 2**62 + 5):
        words = toy.random_words(torch.tensor(indices), seed, count=3)
        for n, index in enumerate(indices):
            for k in range(3):
                assert int(words[n, k]) & MASK64 == splitmix64_reference(seed, index, k + 1), (seed, index, k)


def test_same_index_gives_the_same_image_in_any_batch_and_order():
    indices = torch.tensor([5, 17, 3, 1000, 2**40, 99, 4])
    images, labels = toy.make_batch(indices, seed=3)
    # A longer, shuffled batch containing the same indices (long enough that torch's vectorised loops
    # and their scalar tails handle different elements than in the short batch).
    bigger = torch.cat([torch.arange(200, 257), indices.flip(0), torch.arange(500, 531)])
    images2, labels2 = toy.make_batch(bigger, seed=3)
    where = torch.arange(57, 57 + len(indices)).flip(0)
    assert torch.equal(images2[where], images) and torch.equal(labels2[where], labels)
    for i, index in enumerate(indices.tolist()):  # one at a time
        single, label = toy.make_batch(torch.tensor([index]), seed=3)
        assert torch.equal(single[0], images[i]) and int(label) == int(labels[i])


def test_seeds_and_indices_give_different_images():
    a, _ = toy.make_batch(torch.arange(64), seed=0)
    b, _ = toy.make_batch(torch.arange(64), seed=1)
    assert all(not torch.equal(a[i], b[i]) for i in range(64))
    assert len({tuple(image.flatten()[::7].tolist()) for image in a}) == 64  # no two images alike


# --------------------------------------------------------------------------
# Shapes, ranges, balance
# --------------------------------------------------------------------------


@pytest.mark.parametrize("size", [32, 16])
def test_shapes_dtypes_and_ranges(size):
    images, labels = toy.make_batch(torch.arange(100), seed=0, image_size=size)
    assert images.shape == (100, 3, size, size) and images.dtype == torch.float32
    assert labels.shape == (100,) and labels.dtype == torch.int64
    assert images.min() >= -1 and images.max() <= 1
    assert labels.min() >= 0 and labels.max() < toy.NUM_CLASSES
    # Every image shows a shape on the background: some pixels far from the background value.
    background = toy.BACKGROUND * 2 - 1
    assert ((images - background).abs().amax(dim=(1, 2, 3)) > 0.5).all()
    # The background is what most pixels show, the object a good part of the image (not a speck).
    covered = ((images - background).abs().amax(dim=1) > 0.05).float().mean(dim=(1, 2))
    assert covered.min() > 0.04 and covered.max() < 0.7
    # Same parameters at both resolutions: the 16-px image is close to the 32-px one downscaled.
    if size == 16:
        big, big_labels = toy.make_batch(torch.arange(100), seed=0, image_size=32)
        assert torch.equal(labels, big_labels)
        assert (torch.nn.functional.avg_pool2d(big, 2) - images).abs().mean() < 0.02


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError):
        toy.make_batch(torch.tensor([[1, 2]]))
    with pytest.raises(ValueError):
        toy.make_batch(torch.tensor([1.0]))
    with pytest.raises(ValueError):
        toy.make_batch(torch.arange(3), image_size=4)


def test_classes_are_balanced_and_named():
    assert toy.NUM_CLASSES == 10 and len(toy.CLASS_NAMES) == 10 and len(set(toy.CLASS_NAMES)) == 10
    _, labels = toy.make_batch(torch.arange(5000), seed=0)
    fractions = torch.bincount(labels, minlength=10).float() / 5000
    assert (fractions - 0.1).abs().max() < 0.02, fractions


def test_dataset_view_matches_make_batch():
    data = toy.ToyShapes(20, seed=4, image_size=16)
    images, labels = toy.make_batch(torch.arange(20), seed=4, image_size=16)
    assert len(data) == 20
    x, y = data[7]
    assert torch.equal(x, images[7]) and y == int(labels[7]) and isinstance(y, int)
    xb, yb = next(iter(torch.utils.data.DataLoader(data, batch_size=20)))  # through __getitems__
    assert torch.equal(xb, images) and torch.equal(yb, labels)
    assert torch.equal(torch.stack([data[i][0] for i in range(20)]), images)  # one by one
    with pytest.raises(IndexError):
        data[20]


# --------------------------------------------------------------------------
# The classes look different
# --------------------------------------------------------------------------


def test_colour_family_of_each_class():
    images, labels = toy.make_batch(torch.arange(3000), seed=0)
    rgb = (images + 1) / 2
    background = toy.BACKGROUND
    for k, name in enumerate(toy.CLASS_NAMES):
        pixels = rgb[labels == k].permute(1, 0, 2, 3).reshape(3, -1)
        pixels = pixels[:, (pixels - background).abs().amax(dim=0) > 0.5]  # well inside the shape
        r, g, b = pixels.mean(dim=1).tolist()
        if name.startswith("red"):
            assert r > 0.75 and b < 0.3 and g < 0.3, (name, r, g, b)
        else:
            assert b > 0.8 and r < 0.3 and g < 0.55, (name, r, g, b)


def centred(shape: str, radius: float = 0.6, angle: float = 0.0, colour: str = "red") -> dict[str, torch.Tensor]:
    """Parameters of one shape in the middle of the image."""
    label = list(toy.COLOURS).index(colour) * len(toy.SHAPES) + toy.SHAPES.index(shape)
    return {
        "label": torch.tensor([label]),
        "radius": torch.tensor([radius]),
        "centre": torch.zeros(1, 2),
        "rotation": torch.tensor([[math.cos(angle), math.sin(angle)]]),
        "colour": torch.tensor([toy.COLOURS[colour]]),
    }


def covered_area(params: dict[str, torch.Tensor], size: int = 64) -> float:
    """Area covered by the shape, in units where the image is [-1, 1]^2 (area 4)."""
    image = (toy.render(params, size)[0, 0] + 1) / 2
    coverage = (image - toy.BACKGROUND) / (params["colour"][0, 0] - toy.BACKGROUND)
    return coverage.sum().item() * (2 / size) ** 2


def test_shape_areas_match_geometry_and_differ():
    r = 0.6
    arm = r / math.sqrt(1 + 0.34**2)
    width = 0.34 * arm
    ring = 0.42 * r
    expected = {
        "circle": math.pi * r**2,
        "square": 2 * r**2,  # a square inscribed in the circle of radius r
        "triangle": 3 * math.sqrt(3) / 4 * r**2,  # an equilateral triangle inscribed in it
        "plus": 2 * (2 * arm) * (2 * width) - (2 * width) ** 2,  # two bars, minus their overlap
        "ring": math.pi * (r**2 - (r - ring) ** 2),
    }
    areas = {}
    for shape, area in expected.items():
        areas[shape] = covered_area(centred(shape, r))
        assert areas[shape] == pytest.approx(area, rel=0.02), shape
        # Turning a shape does not change its area (anti-aliasing is sub-pixel accurate).
        assert covered_area(centred(shape, r, angle=0.4)) == pytest.approx(area, rel=0.02), shape
    # At equal size, circle, square and triangle cover clearly different areas (square, plus and ring do not,
    # by design: they must be told apart by their form, as the next test checks).
    assert areas["circle"] / areas["square"] > 1.5 and areas["square"] / areas["triangle"] > 1.5


def test_shapes_differ_pixelwise_at_equal_size_and_position():
    # Intersection over union of the covered pixels of any two shapes: at most 0.8 for every pair,
    # at several rotations of the second shape.
    def coverage(shape, angle=0.0):
        return (toy.render(centred(shape, 0.6, angle), 64)[0, 0] + 1) / 2 - toy.BACKGROUND

    for i, first in enumerate(toy.SHAPES):
        for second in toy.SHAPES[i + 1 :]:
            for angle in (0.0, 0.4, 0.8, 1.2):
                a, b = coverage(first), coverage(second, angle)
                iou = torch.minimum(a, b).sum() / torch.maximum(a, b).sum()
                assert iou < 0.8, (first, second, angle, iou)


def test_shapes_have_their_features():
    size = 64
    middle = size // 2

    def image(shape, angle=0.0):
        return (toy.render(centred(shape, 0.6, angle), size)[0, 0] + 1) / 2

    background = toy.BACKGROUND
    # Ring: a hole in the middle. Circle, square, plus: filled there.
    assert image("ring")[middle - 2 : middle + 2, middle - 2 : middle + 2].max() == pytest.approx(background)
    for shape in ("circle", "square", "plus"):
        assert image(shape)[middle - 2 : middle + 2, middle - 2 : middle + 2].min() > 0.8
    # Plus: the diagonal at 75% of the radius is empty; the square covers it.
    diagonal = middle + round(0.75 * 0.6 / math.sqrt(2) * size / 2)
    assert image("plus")[diagonal, diagonal] == pytest.approx(background)
    assert image("square")[diagonal, diagonal] > 0.8
    # Square and plus look the same after a quarter turn; the triangle does not after a half turn.
    for shape in ("square", "plus"):
        assert (image(shape, 0.3) - image(shape, 0.3 + math.pi / 2)).abs().max() < 1e-4
    assert (image("triangle") - image("triangle", math.pi)).abs().max() > 0.5


# --------------------------------------------------------------------------
# The shipped classifier
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def classifier():
    return toy.load_classifier()


def test_shipped_classifier_is_small_and_accurate_on_fresh_data(classifier):
    assert toy.DEFAULT_CLASSIFIER.stat().st_size < 500_000
    seed = 12345
    assert seed != toy.TRAIN_SEED
    images, labels = toy.make_batch(torch.arange(500), seed=seed)
    assert (toy.classify(images, classifier) == labels).float().mean() >= 0.99
    assert classifier.features(images[:4]).shape == (4, 128)
    # Smaller images are resized to the classifier's resolution.
    small, small_labels = toy.make_batch(torch.arange(200), seed=seed, image_size=16)
    assert (toy.classify(small, classifier) == small_labels).float().mean() >= 0.97


def test_classifier_judges_colour_and_shape_not_noise(classifier):
    images, labels = toy.make_batch(torch.arange(300), seed=77)
    # Swapping the red and blue channels turns a red shape into a blue one of the same shape.
    swapped = toy.classify(images[:, [2, 1, 0]], classifier)
    assert ((swapped // 5 != labels // 5) & (swapped % 5 == labels % 5)).float().mean() >= 0.97
    # Mildly damaged images (noise, blur) keep their class.
    g = torch.Generator().manual_seed(0)
    noisy = images + 0.2 * torch.randn(images.shape, generator=g)
    blurred = torch.nn.functional.avg_pool2d(images, 3, stride=1, padding=1, count_include_pad=False)
    assert (toy.classify(noisy, classifier) == labels).float().mean() >= 0.97
    assert (toy.classify(blurred, classifier) == labels).float().mean() >= 0.97
    # Pure noise, flat colours and two shapes overlaid are of no class: low confidence, no favourite class.
    junk = torch.cat(
        [
            torch.randn(100, 3, 32, 32, generator=g),
            (2 * torch.rand(100, 3, 1, 1, generator=g) - 1).expand(100, 3, 32, 32),
            (images[:100] + images[100:200]) / 2,
        ]
    )
    with torch.no_grad():
        probabilities = torch.softmax(classifier(junk), dim=1)
    assert probabilities.max(dim=1).values.mean() < 0.5
    assert torch.bincount(probabilities.argmax(dim=1), minlength=10).max() < 0.6 * len(junk)
    assert (toy.classify(junk, classifier, min_confidence=0.5) == -1).float().mean() > 0.8
    assert (toy.classify(images, classifier, min_confidence=0.5) == labels).float().mean() >= 0.99


def test_missing_classifier_says_how_to_train_one(tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(UserError, match="python -m minidit.toy train-classifier") as e:
        toy.load_classifier(missing)
    assert "\n" not in str(e.value) and str(missing) in str(e.value)


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------


def test_preview_cli_writes_a_png(tmp_path, capsys):
    out = tmp_path / "preview.png"
    assert toy.main(["preview", "--out", str(out), "--per-class", "3"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    height, width, _ = matplotlib.image.imread(str(out)).shape
    assert height > width > 0  # 10 rows of 3 images
    assert "red circle" in capsys.readouterr().out


def test_train_classifier_cli_end_to_end(tmp_path, capsys):
    out = tmp_path / "sub" / "clf.safetensors"
    argv = ["train-classifier", "--steps", "3", "--batch-size", "16", "--held-out", "100", "--out", str(out)]
    assert toy.main(argv) == 0
    assert "held-out accuracy" in capsys.readouterr().out
    trained = toy.load_classifier(out)
    assert trained(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert run_cli(toy.main, ["train-classifier", "--steps", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--steps: must be at least 1" in err[0]
    assert run_cli(toy.main, ["train-classifier", "--out", str(tmp_path / "clf.pt")]) == 2
    assert "must end in .safetensors" in capsys.readouterr().err
    assert run_cli(toy.main, ["train-classifer"]) == 2  # a misspelled command: one line, with a suggestion
    assert "train-classifier" in capsys.readouterr().err
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    assert run_cli(toy.main, ["preview", "--out", str(not_a_dir / "x.png")]) == 2
    assert capsys.readouterr().err.startswith("error: cannot write")
