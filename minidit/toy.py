"""Toy shapes: a class-labelled image dataset generated on the fly, and a small classifier that judges it.

Ten classes, five shapes in two colours, drawn on a dark background::

    0 red circle    1 red square    2 red triangle    3 red plus    4 red ring
    5 blue circle   6 blue square   7 blue triangle   8 blue plus   9 blue ring

Each image has its own random position, size, a small rotation and a slight colour jitter. Nothing is
downloaded and nothing is stored: image ``i`` is a pure function of ``(seed, i, image_size)``,
computed in a few milliseconds per batch, so a tiny DiT can train on it on a laptop CPU in minutes.
The classes differ in both shape and colour, which is meant to make classifier-free guidance
visible: a model that ignores the label can only hedge between red and blue and between shapes,
while a guided one should draw a crisp red square.

How an image is made (``make_batch``):

1. **Random numbers per index.** Each index gets its own small random-number generator
   (splitmix64, seeded by hashing ``(seed, index)``), written with int64 torch ops so a whole
   batch is hashed at once. The same index gives the same numbers in any batch, in any order.
2. **Parameters.** Those numbers become a label, a radius, a centre, a rotation and a colour.
3. **Rendering.** Every pixel gets its signed distance to the shape's edge (negative inside);
   coverage ``clamp(0.5 - distance / pixel, 0, 1)`` fades over one pixel, which anti-aliases the
   edge. The image is ``background * (1 - coverage) + colour * coverage``.

``ToyClassifier`` is a three-layer CNN trained on this data (``python -m minidit.toy
train-classifier``); the repository ships its weights in ``data/toy_classifier.safetensors``.
It reports how many DiT samples land in the class they were asked for. It is trained on slightly
damaged images (noise, blur, contrast), so soft samples still count, and to be unsure on images of
no class (noise, flat colours, two shapes overlaid, purple shapes), so smears do not.

Command line::

    python -m minidit.toy preview --out toy_preview.png     # one row per class
    python -m minidit.toy train-classifier                  # about a minute on 2 CPU cores
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ArgumentParser, UserError, positive_int, run_cli

SHAPES = ["circle", "square", "triangle", "plus", "ring"]
COLOURS = {"red": (0.90, 0.16, 0.12), "blue": (0.16, 0.42, 0.96)}  # RGB in [0, 1]
CLASS_NAMES: list[str] = [f"{colour} {shape}" for colour in COLOURS for shape in SHAPES]
NUM_CLASSES = len(CLASS_NAMES)  # 10; class = colour_index * 5 + shape_index

BACKGROUND = 0.08  # dark grey, the same for every image
COLOUR_JITTER = 0.06  # each RGB channel of the shape is shifted by up to +-this
RADIUS_RANGE = (0.60, 0.85)  # radius of the circle that holds the shape, in units of half the image side
#: Largest rotation of the dataset's shapes, in degrees. Kept small: with +-90 degrees a tiny DiT needs
#: far longer than a few CPU minutes to draw crisp squares, triangles and pluses (it learns to hedge
#: between poses first), while with +-10 it gets them right. The classifier trains on +-90.
MAX_ROTATION = 10.0
CLASSIFIER_MAX_ROTATION = 90.0
MARGIN = 0.04  # minimum gap between that circle and the image border (same units)

DEFAULT_CLASSIFIER = Path(__file__).resolve().parents[1] / "data" / "toy_classifier.safetensors"
TRAIN_COMMAND = "python -m minidit.toy train-classifier"
TRAIN_SEED = 0  # the data seed the shipped classifier was trained on
DEFAULT_DIT = DEFAULT_CLASSIFIER.parent / "toy_dit.safetensors"
#: How data/toy_dit.safetensors is made (the default toy config, seed 0); data/README.md records the run.
DIT_COMMAND = "python -m minidit.train --run-dir runs/toy && python -m minidit.toy export-dit runs/toy"
#: The same recipe trained with the flow-matching objective (lesson 11); data/README.md records the run.
DEFAULT_FLOW_DIT = DEFAULT_CLASSIFIER.parent / "toy_flow_dit.safetensors"
FLOW_DIT_COMMAND = (
    "python -m minidit.train --objective flow --run-dir runs/toy-flow"
    " && python -m minidit.toy export-dit runs/toy-flow --out data/toy_flow_dit.safetensors"
)


# --------------------------------------------------------------------------
# Counter-based random numbers: splitmix64 in int64 torch ops
# --------------------------------------------------------------------------

_GOLDEN = 0x9E3779B97F4A7C15  # splitmix64's increment, 2**64 / golden ratio
_MUL1 = 0xBF58476D1CE4E5B9
_MUL2 = 0x94D049BB133111EB


def _int64(u: int) -> int:
    """The int64 with the same 64 bits as the unsigned integer ``u`` (torch has no uint64 arithmetic)."""
    u &= (1 << 64) - 1
    return u - (1 << 64) if u >= 1 << 63 else u


def shift_right(z: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns: ``>>`` is arithmetic (copies the sign bit), so mask it off."""
    return (z >> k) & ((1 << (64 - k)) - 1)


def _mix64(z: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser: a bijection on 64-bit words that scrambles every input bit into every
    output bit. int64 multiplication wraps around modulo 2**64, exactly like uint64 in C."""
    z = (z ^ shift_right(z, 30)) * _int64(_MUL1)
    z = (z ^ shift_right(z, 27)) * _int64(_MUL2)
    return z ^ shift_right(z, 31)


def random_words(indices: torch.Tensor, seed: int, count: int) -> torch.Tensor:
    """``count`` random 64-bit words per index: int64 [N] -> int64 [N, count].

    Index ``i`` gets a splitmix64 generator whose state starts at ``mix64(i ^ mix64(seed))``; word ``k``
    is its ``k``-th output. Everything is elementwise, so row ``n`` depends only on ``(seed, indices[n])``.
    """
    seed_word = _mix64(torch.tensor(_int64(seed), dtype=torch.int64))
    state = _mix64(indices.to(torch.int64) ^ seed_word)
    steps = torch.arange(1, count + 1, dtype=torch.int64) * _int64(_GOLDEN)
    return _mix64(state[:, None] + steps)  # int64 addition wraps too


def uniform(words: torch.Tensor) -> torch.Tensor:
    """Random words (``random_words``) -> float32 uniform in [0, 1): the top 24 bits, which float32 holds exactly."""
    return shift_right(words, 40).to(torch.float32) / 2**24


# --------------------------------------------------------------------------
# Parameters and rendering
# --------------------------------------------------------------------------


def sample_params(indices: torch.Tensor, seed: int = 0, max_rotation: float = MAX_ROTATION) -> dict[str, torch.Tensor]:
    """The random parameters of images ``indices`` (int64 [N]).

    Returns a dict of tensors, all in image units where the image spans [-1, 1] on both axes:

    - ``label`` int64 [N]: the class, uniform over the 10 classes;
    - ``radius`` float32 [N]: radius of the circle that holds the shape (its circumradius);
    - ``centre`` float32 [N, 2]: (x, y) of the shape's centre, placed so the shape stays inside;
    - ``rotation`` float32 [N, 2]: (cos, sin) of the rotation angle;
    - ``colour`` float32 [N, 3]: RGB in [0, 1].
    """
    words = random_words(indices, seed, count=8)
    u = uniform(words)  # [N, 8] uniform floats; column k is the k-th draw of each image
    label = shift_right(words[:, 0], 1) % NUM_CLASSES

    lo, hi = RADIUS_RANGE
    radius = lo + (hi - lo) * u[:, 1]
    room = 1 - MARGIN - radius  # how far the centre may move from the middle
    centre = (2 * u[:, 2:4] - 1) * room[:, None]

    # A rotation from (cos, sin) = ((1 - t^2) / (1 + t^2), 2t / (1 + t^2)) with t uniform in [-m, m),
    # m = tan(max_rotation / 2): the angle 2 * atan(t) lies in [-max_rotation, max_rotation) (for 90
    # degrees up to twice as often near the ends as near 0; for 10 degrees nearly uniform). +-90 degrees
    # covers every pose of our shapes (the square and the plus repeat every 90 degrees, the triangle every 120).
    # Why not torch.cos / torch.sin of a uniform angle? IEEE 754 rounds +, -, *, / and sqrt exactly, so the
    # same inputs give the same bits on any CPU and in any code path (SIMD lanes or scalar loop); cos and sin
    # carry no such guarantee, and an image could then change by a bit with the machine or with where its
    # index sits in the batch. Rendering below uses only exactly rounded operations too.
    t = math.tan(math.radians(max_rotation) / 2) * (2 * u[:, 4] - 1)
    rotation = torch.stack([(1 - t * t) / (1 + t * t), 2 * t / (1 + t * t)], dim=1)

    base = torch.tensor(list(COLOURS.values()), dtype=torch.float32)[label // len(SHAPES)]
    colour = (base + COLOUR_JITTER * (2 * u[:, 5:8] - 1)).clamp(0, 1)
    return {"label": label, "radius": radius, "centre": centre, "rotation": rotation, "colour": colour}


# Signed distance to each shape's edge (negative inside) at local coordinates (x, y), for shapes that fit
# in a circle of radius r. Polygons use the distance to their sides' lines, max over the sides: exact
# inside and along the edges, and a little short of the true distance just outside a corner, which only
# changes the anti-aliasing there.
_RING_WIDTH = 0.42  # ring thickness as a fraction of its outer radius
_PLUS_WIDTH = 0.34  # half-width of the plus's arms as a fraction of their half-length
_TRIANGLE_NORMALS = [(math.cos(a), math.sin(a)) for a in (math.pi / 2 + k * 2 * math.pi / 3 for k in range(3))]


def _circle(x, y, r):
    return torch.sqrt(x * x + y * y) - r


def _square(x, y, r):
    return torch.maximum(x.abs(), y.abs()) - r / math.sqrt(2)  # half-side r / sqrt(2)


def _triangle(x, y, r):
    sides = [nx * x + ny * y for nx, ny in _TRIANGLE_NORMALS]  # distances along the 3 outward normals
    return torch.maximum(torch.maximum(sides[0], sides[1]), sides[2]) - r / 2  # inradius = circumradius / 2


def _plus(x, y, r):
    arm = r / math.sqrt(1 + _PLUS_WIDTH**2)  # half-length, so the arms' corners touch the circle
    width = _PLUS_WIDTH * arm
    horizontal = torch.maximum(x.abs() - arm, y.abs() - width)
    vertical = torch.maximum(x.abs() - width, y.abs() - arm)
    return torch.minimum(horizontal, vertical)  # union of two bars


def _ring(x, y, r):
    half_width = _RING_WIDTH * r / 2
    return (torch.sqrt(x * x + y * y) - (r - half_width)).abs() - half_width


_SDF = [_circle, _square, _triangle, _plus, _ring]  # in the order of SHAPES


def render(params: dict[str, torch.Tensor], image_size: int = 32) -> torch.Tensor:
    """Draw the shapes described by ``params`` (see ``sample_params``): float32 [N, 3, S, S] in [-1, 1]."""
    if image_size < 8:
        raise ValueError(f"image_size must be at least 8, got {image_size}")
    n, s = params["label"].shape[0], image_size
    pixel = 2.0 / s  # side of one pixel in image units
    grid = (torch.arange(s, dtype=torch.float32) + 0.5) * pixel - 1  # pixel centres, [S]

    # Pixel positions relative to each shape's centre: dx varies along columns only [N, 1, S], dy along rows
    # only [N, S, 1] ...
    dx = grid[None, None, :] - params["centre"][:, 0, None, None]
    dy = grid[None, :, None] - params["centre"][:, 1, None, None]
    # ... turned by minus the shape's angle: shape-local coordinates x, y [N, S, S] (broadcasting).
    cos, sin = params["rotation"][:, 0, None, None], params["rotation"][:, 1, None, None]
    x, y = cos * dx + sin * dy, cos * dy - sin * dx

    shape = params["label"] % len(SHAPES)
    radius = params["radius"][:, None, None]
    distance = torch.empty(n, s, s)
    for k, sdf in enumerate(_SDF):
        chosen = shape == k
        distance[chosen] = sdf(x[chosen], y[chosen], radius[chosen])

    coverage = (0.5 - distance / pixel).clamp(0, 1)[:, None]  # [N, 1, S, S]: fades over one pixel
    # background * (1 - coverage) + colour * coverage, with the colours mapped from [0, 1] to [-1, 1] first
    background, colour = BACKGROUND * 2 - 1, params["colour"][:, :, None, None] * 2 - 1
    return background + (colour - background) * coverage  # [N, 3, S, S]


def as_indices(indices) -> torch.Tensor:
    """Sample indices as a 1-D int64 CPU tensor (a list, a range or an integer tensor); anything else (floats, a
    2-D tensor) is a ValueError rather than silently rounded. Shared by the toy, caption and video datasets."""
    indices = torch.as_tensor(indices).cpu()
    if indices.dim() != 1 or indices.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise ValueError(f"indices must be a 1-D integer tensor, got {indices.dtype} of shape {tuple(indices.shape)}")
    return indices.to(torch.int64)


def make_batch(
    indices: torch.Tensor, seed: int = 0, image_size: int = 32, max_rotation: float = MAX_ROTATION
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images and labels of the samples ``indices``.

    indices: int64 [N] global sample indices (any int64 values) ->
    (images float32 [N, 3, S, S] in [-1, 1], labels int64 [N]), with S = ``image_size``.
    Image i depends only on (seed, indices[i], image_size): the same index gives the same image in any
    batch, in any order. Different seeds give independent datasets. Rendered on the CPU (move the result).
    """
    indices = as_indices(indices)
    params = sample_params(indices, seed, max_rotation)
    return render(params, image_size), params["label"]


class ToyShapes(torch.utils.data.Dataset):
    """A map-style view of the toy data: item ``i`` is ``(image float32 [3, S, S] in [-1, 1], label int)``.

    For code that wants a ``Dataset``. A ``DataLoader`` over it renders each batch with one ``make_batch``
    call (through ``__getitems__``), as fast as calling ``make_batch`` yourself.
    """

    def __init__(self, length: int, seed: int = 0, image_size: int = 32):
        if length < 0:
            raise ValueError(f"length must be >= 0, got {length}")
        self.length, self.seed, self.image_size = length, seed, image_size

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if not -self.length <= i < self.length:
            raise IndexError(f"index {i} out of range for a ToyShapes of length {self.length}")
        images, labels = make_batch(torch.tensor([i % self.length]), self.seed, self.image_size)
        return images[0], int(labels[0])

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, int]]:
        """Many items at once (what ``DataLoader`` asks for when the dataset offers it)."""
        if any(not -self.length <= i < self.length for i in indices):
            raise IndexError(f"an index in {indices} is out of range for a ToyShapes of length {self.length}")
        images, labels = make_batch(torch.tensor([i % self.length for i in indices]), self.seed, self.image_size)
        return list(zip(images, labels.tolist()))


# --------------------------------------------------------------------------
# The classifier
# --------------------------------------------------------------------------


class ToyClassifier(nn.Module):
    """A small CNN that names the class of a toy image: forward(x [N, 3, S, S] in [-1, 1]) -> logits [N, 10].

    Three 3x3 conv layers (32, 64, 128 channels, ReLU, 2x2 max-pool after the first two), a global max
    pool to 128 features ("is this pattern anywhere in the image?", which learns much faster here than an
    average), and a linear layer. 94,538 parameters: a 370 KB file in fp32.
    ``image_size`` is the resolution it was trained at (stored with the weights); images of another
    size are resized to it first.
    """

    def __init__(self, image_size: int = 32):
        super().__init__()
        self.register_buffer("image_size", torch.tensor(image_size, dtype=torch.int64))
        self.conv1 = nn.Conv2d(3, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.conv3 = nn.Conv2d(64, 128, 3, padding=1)
        self.head = nn.Linear(128, NUM_CLASSES)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features: x [N, 3, S, S] in [-1, 1] -> [N, 128]."""
        size = int(self.image_size)
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.conv3(x))
        return x.amax(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def load_classifier(path: str | os.PathLike | None = None, image_size: int = 32) -> ToyClassifier:
    """Load a trained ``ToyClassifier`` in eval mode (default: the shipped ``data/toy_classifier.safetensors``).

    ``image_size`` is the size of the images you will classify; if the weights were trained at another
    size, the classifier resizes its inputs to that size. A missing file raises ``UserError``.
    """
    from .checkpoint import CheckpointError, read_file

    if image_size < 8:
        raise UserError(f"image_size must be at least 8, got {image_size}")
    path = Path(path) if path is not None else DEFAULT_CLASSIFIER
    if not path.is_file():
        command = TRAIN_COMMAND if path == DEFAULT_CLASSIFIER else f"{TRAIN_COMMAND} --out {path}"
        raise UserError(f"no toy classifier at {path}: train one with `{command}` (about a minute on 2 CPU cores)")
    try:
        state = read_file(path)
    except CheckpointError as e:
        raise UserError(str(e)) from None
    if "image_size" not in state:
        raise UserError(f"{path} is not a toy classifier (no image_size entry): train one with `{TRAIN_COMMAND}`")
    classifier = ToyClassifier(int(state["image_size"]))
    try:
        classifier.load_state_dict(state)
    except RuntimeError as e:
        raise UserError(f"{path} does not fit ToyClassifier: {str(e).splitlines()[0]}") from None
    return classifier.eval()


@torch.no_grad()
def classify(
    images: torch.Tensor, classifier: ToyClassifier | None = None, batch_size: int = 256, min_confidence: float = 0.0
) -> torch.Tensor:
    """Predicted classes of images float32 [N, 3, S, S] in [-1, 1] -> int64 [N] (the shipped classifier by default).

    The classifier was trained to be unsure (near-uniform probabilities) on images of no class: noise,
    flat colours, two shapes overlaid, shapes in an in-between colour. By default every image still gets
    its most likely class; with ``min_confidence`` (e.g. 0.5), images whose top probability is lower get
    label -1 ("no class"), so a smear never counts as the right class by luck.
    """
    if classifier is None:
        classifier = load_classifier(image_size=images.shape[-1])
    device = next(classifier.parameters()).device
    labels = []
    for chunk in images.split(batch_size):
        confidence, label = F.softmax(classifier(chunk.to(device, torch.float32)), dim=1).max(dim=1)
        labels.append(torch.where(confidence >= min_confidence, label, -1).cpu())
    return torch.cat(labels) if labels else torch.empty(0, dtype=torch.int64)


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Light damage, so the classifier judges shape and colour rather than pixel-perfect edges (DiT samples
    are a little noisy and soft): contrast/brightness jitter, a random amount of 3x3 blur, Gaussian noise."""
    n = x.shape[0]

    def rand(*shape):
        return torch.rand(*shape, generator=generator)

    x = x * (0.8 + 0.4 * rand(n, 1, 1, 1)) + 0.2 * (rand(n, 1, 1, 1) - 0.5)
    blurred = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    x = torch.lerp(x, blurred, rand(n, 1, 1, 1))
    return x + 0.15 * rand(n, 1, 1, 1) * torch.randn(x.shape, generator=generator)


def _junk(params: dict[str, torch.Tensor], images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Images of no class, one per image of ``images`` [N, 3, S, S] (whose ``params`` they reuse), of four kinds
    in turn: Gaussian noise, a flat colour, the average of two toy images, a toy shape in a colour halfway
    between red and blue. The classifier learns to be unsure on them, so junk is never confidently a class."""
    n, _, s, _ = images.shape

    def rand(*shape):
        return torch.rand(*shape, generator=generator)

    colour = 2 * rand(n, 3, 1, 1) - 1
    noise = colour + rand(n, 1, 1, 1) * torch.randn(images.shape, generator=generator)
    flat = colour.expand(n, 3, s, s)
    average = (images + images.roll(1, dims=0)) / 2  # two different images, usually of different classes
    red, blue = (torch.tensor(rgb) for rgb in COLOURS.values())
    halfway = render({**params, "colour": torch.lerp(red, blue, 0.35 + 0.3 * rand(n, 1))}, s)
    kind = torch.arange(n) % 4
    return torch.stack([noise, flat, average, halfway])[kind, torch.arange(n)]


def evaluate(classifier: ToyClassifier, n: int = 2000, seed: int = 1, image_size: int = 32, start: int = 0) -> float:
    """Accuracy of ``classifier`` on toy images ``start ... start + n - 1`` of data seed ``seed``."""
    images, labels = make_batch(torch.arange(start, start + n), seed, image_size)
    return (classify(images, classifier) == labels).float().mean().item()


HELD_OUT_START = 1 << 40  # training uses indices below this; held-out accuracy is measured above it


def train_classifier(
    out: str | os.PathLike,
    steps: int = 800,
    batch_size: int = 128,
    seed: int = TRAIN_SEED,
    image_size: int = 32,
    held_out: int = 5000,
) -> dict:
    """Train a ``ToyClassifier`` on fresh toy images (data seed ``seed``) and save it to ``out`` (safetensors).

    Step ``k`` sees the toy images ``k * batch_size ... (k + 1) * batch_size - 1`` (every image is new) and
    ``batch_size // 4`` junk images (``_junk``), all damaged a little by ``augment``. Loss: cross-entropy
    with the class for toy images, with the uniform distribution for junk. ``seed`` seeds the data, the
    initial weights and the augmentation. Returns ``{"accuracy", "held_out", "steps", "seconds", "path"}``:
    the accuracy on ``held_out`` held-out images (indices from ``HELD_OUT_START`` on, never trained on).
    """
    from tqdm import tqdm

    from .checkpoint import save_checkpoint

    with torch.random.fork_rng():  # seed the initial weights without touching the caller's global RNG
        torch.manual_seed(seed)
        classifier = ToyClassifier(image_size)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=3e-3, weight_decay=1e-4)
    warmup = max(1, steps // 10)  # linear warm-up, then a cosine decay to 0
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda k: min(1, (k + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * k / steps))
    )
    start = time.perf_counter()
    classifier.train()
    bar = tqdm(range(steps), desc="toy classifier", unit="step")
    for step in bar:
        params = sample_params(torch.arange(step * batch_size, (step + 1) * batch_size), seed, CLASSIFIER_MAX_ROTATION)
        images, labels = render(params, image_size), params["label"]
        few = batch_size // 4
        junk = _junk({k: v[:few] for k, v in params.items()}, images[:few], generator)
        logits = classifier(augment(torch.cat([images, junk]), generator))
        loss = class_loss = F.cross_entropy(logits[:batch_size], labels)
        if few > 0:  # junk: cross-entropy with the uniform distribution over the classes (at best log 10)
            loss = class_loss - 0.5 * F.log_softmax(logits[batch_size:], dim=1).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 20 == 0:
            bar.set_postfix(class_loss=f"{class_loss.item():.4f}")
    bar.close()
    classifier.eval()
    accuracy = evaluate(classifier, held_out, seed, image_size, start=HELD_OUT_START)
    save_checkpoint(classifier.state_dict(), out)
    seconds = time.perf_counter() - start
    return {"accuracy": accuracy, "held_out": held_out, "steps": steps, "seconds": seconds, "path": str(out)}


# --------------------------------------------------------------------------
# Previews
# --------------------------------------------------------------------------


def save_grid(images: torch.Tensor, path: str | os.PathLike, nrow: int = 8, scale: int = 4) -> None:
    """Save images float32 [N, 3, S, S] in [-1, 1] as one PNG grid, ``nrow`` images per row, each pixel
    drawn as a ``scale`` x ``scale`` block, with a 1-pixel (scaled) white border between images."""
    import matplotlib.image

    n, _, s, _ = images.shape
    rows = math.ceil(n / nrow)
    grid = torch.ones(3, rows * (s + 1) + 1, nrow * (s + 1) + 1)
    for i, image in enumerate(((images.detach().cpu().float() + 1) / 2).clamp(0, 1)):
        r, c = divmod(i, nrow)
        grid[:, 1 + r * (s + 1) : 1 + r * (s + 1) + s, 1 + c * (s + 1) : 1 + c * (s + 1) + s] = image
    grid = grid.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    matplotlib.image.imsave(str(path), grid.permute(1, 2, 0).numpy())


def preview_batch(per_class: int = 8, seed: int = 0, image_size: int = 32) -> torch.Tensor:
    """The first ``per_class`` images of each class (data seed ``seed``), class by class: [10 * per_class, 3, S, S]."""
    indices = torch.arange(per_class * NUM_CLASSES * 4)
    while True:
        images, labels = make_batch(indices, seed, image_size)
        if all((labels == k).sum() >= per_class for k in range(NUM_CLASSES)):
            return torch.cat([images[labels == k][:per_class] for k in range(NUM_CLASSES)])
        indices = torch.arange(len(indices) * 2)


# --------------------------------------------------------------------------
# The shipped toy DiT (lessons 06 and 07 sample it instantly)
# --------------------------------------------------------------------------


def export_dit(run_dir: str | os.PathLike, out: str | os.PathLike = DEFAULT_DIT) -> Path:
    """Write the EMA weights of a toy training run to a small safetensors file: fp16 weights (the fixed
    ``pos_embed`` table stays fp32), with the run's config, class names and step in the metadata."""
    import json

    from safetensors.torch import save_file

    from .checkpoint import read_checkpoint, read_file
    from .fileio import atomic_write

    sd, meta = read_checkpoint(run_dir)
    if meta["train_config"] is None or meta["run_dir"] is None:
        raise UserError(f"{run_dir}: not a minidit run directory (no checkpoints/last.pt with its config)")
    step = read_file(Path(meta["run_dir"]) / "checkpoints" / "last.pt").get("step")
    tensors = {k: (v if k == "pos_embed" else v.half()).contiguous() for k, v in sd.items()}
    info = {
        "format": "minidit toy DiT",
        "config": json.dumps(meta["train_config"], sort_keys=True),
        "class_names": json.dumps(meta["class_names"] or CLASS_NAMES),
        "step": str(int(step)) if isinstance(step, int) else "",
    }
    atomic_write(out, lambda tmp: save_file(tensors, tmp, metadata=info))
    return Path(out)


def load_toy_dit(path: str | os.PathLike | None = None, *, flow: bool = False) -> tuple[torch.nn.Module, dict]:
    """The shipped toy DiT (default ``data/toy_dit.safetensors``; with ``flow=True`` the flow-matching one,
    ``data/toy_flow_dit.safetensors``, ``config["objective"] == "flow"``) in eval mode, float32, and its training
    config (``config["noise_schedule"]``, ``config["diffusion_steps"]``, ``config["image_size"]``,
    ``config["class_names"]``, ...).

    Sample it with ``minidit.sample.generate(model, labels, noise_schedule=config["noise_schedule"],
    clip_denoised=True)`` or a diffusion from ``create_diffusion(steps, config["noise_schedule"])`` and
    ``clip_denoised=True`` in its loops: a pixel-space model needs x0_hat clipped to [-1, 1] (without it the
    cosine schedule's first steps blow up: 20% toy accuracy instead of 100%). A missing file raises
    ``UserError`` naming the command that makes it."""
    from .checkpoint import CheckpointError, model_from_state_dict, read_checkpoint

    path = Path(path) if path is not None else DEFAULT_FLOW_DIT if flow else DEFAULT_DIT
    command = FLOW_DIT_COMMAND if flow else DIT_COMMAND
    if not path.is_file():
        raise UserError(f"no toy DiT at {path}: make one with `{command}` (about 8 minutes on 2 idle CPU cores)")
    try:
        sd, meta = read_checkpoint(path)
        if meta["train_config"] is None:
            raise CheckpointError("no training config in its metadata")
        model = model_from_state_dict({k: v.float() for k, v in sd.items()}, str(path), **meta["dit"])
    except CheckpointError as e:
        raise UserError(f"{path} is not a toy DiT file ({e}): make one with `{command}`") from None
    return model, {**meta["train_config"], "class_names": meta["class_names"] or CLASS_NAMES}


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------


def _image_size(text: str) -> int:
    value = positive_int(text)
    if value < 8:
        raise argparse.ArgumentTypeError(f"must be at least 8, got {value}")
    return value


def check_writable(path: Path) -> None:
    try:
        path.resolve().parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror}") from None
    if path.is_dir() or not os.access(path if path.exists() else path.resolve().parent, os.W_OK):
        raise UserError(f"cannot write {path}: not a writable file path")


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m minidit.toy", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train-classifier", help="train the toy classifier and save its weights")
    train.add_argument("--steps", type=positive_int, default=800, help="optimizer steps (default 800)")
    train.add_argument("--batch-size", type=positive_int, default=128, help="images per step (default 128)")
    train.add_argument("--seed", type=int, default=TRAIN_SEED, help="data and initialisation seed (default 0)")
    train.add_argument("--image-size", type=_image_size, default=32, help="image side in pixels (default 32)")
    train.add_argument("--held-out", type=positive_int, default=5000, help="images to test on (default 5000)")
    train.add_argument("--out", type=Path, default=DEFAULT_CLASSIFIER, help="default data/toy_classifier.safetensors")

    preview = commands.add_parser("preview", help="save a grid of toy images, one row per class")
    preview.add_argument("--out", type=Path, default=Path("toy_preview.png"), help="PNG path (default toy_preview.png)")
    preview.add_argument("--per-class", type=positive_int, default=8, help="images per row (default 8)")
    preview.add_argument("--seed", type=int, default=0, help="data seed (default 0)")
    preview.add_argument("--image-size", type=_image_size, default=32, help="image side in pixels (default 32)")

    export = commands.add_parser("export-dit", help="write a toy run's EMA weights to data/toy_dit.safetensors")
    export.add_argument("run_dir", type=Path, help="a run directory of `python -m minidit.train` (toy config)")
    export.add_argument("--out", type=Path, default=DEFAULT_DIT, help="default data/toy_dit.safetensors")

    args = parser.parse_args(argv)
    if args.command in ("train-classifier", "export-dit") and args.out.suffix != ".safetensors":
        parser.error(f"--out must end in .safetensors, got {args.out}")
    check_writable(args.out)  # fail now, not after a minute of training
    if args.command == "train-classifier":
        result = train_classifier(args.out, args.steps, args.batch_size, args.seed, args.image_size, args.held_out)
        print(
            f"held-out accuracy {result['accuracy']:.2%} on {result['held_out']} images; "
            f"wrote {result['path']} ({os.path.getsize(result['path']) / 1024:.0f} KB) in {result['seconds']:.0f} s"
        )
    elif args.command == "export-dit":
        out = export_dit(args.run_dir, args.out)
        print(f"wrote {out} ({out.stat().st_size / 1024:.0f} KB): EMA weights of {args.run_dir}, fp16")
    else:
        images = preview_batch(args.per_class, args.seed, args.image_size)
        save_grid(images, args.out, nrow=args.per_class)
        print(f"wrote {args.out}: rows are {', '.join(CLASS_NAMES)}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
