"""Measure ``--data folder`` defaults on small real image folders (issue 9, item 3).

Real data available offline, written as class-subfolder PNG folders (never into the repo):

* ``digits``: scikit-learn's 8x8 handwritten digits (1,797 images, 10 classes), bilinearly
  upsampled to 16 px, white ink on black, saved as greyscale PNGs;
* ``textures``: 16x16 crops of ten photographs that ship inside the scikit-image wheel
  (brick, grass, gravel, coffee, cat fur, ...; 180 crops per photo = 1,800 images, 10 classes).

Both packages are measurement dependencies only: ``pip install scikit-learn scikit-image``.

    python benchmarks/folder_defaults.py data --out /tmp/fd                 # /tmp/fd/digits, /tmp/fd/textures
    python benchmarks/folder_defaults.py classifier --folder /tmp/fd/digits  # -> /tmp/fd/digits.classifier.pt
    OMP_NUM_THREADS=1 python -m minidit.train --data folder --data-path /tmp/fd/digits --run-dir /tmp/fd/run-x
    python benchmarks/folder_defaults.py score --run-dir /tmp/fd/run-x --classifier /tmp/fd/digits.classifier.pt
    python benchmarks/folder_defaults.py report /tmp/fd/run-*                # markdown table of the scores

``score`` samples ``--per-class`` images per class from the run's EMA weights with CFG 4 and without
(the run's ``sample_steps``, noise schedule and diffusion steps), and reports the share that the
classifier trained on the real images assigns to the class asked for. Results go to ``<run-dir>/score.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from minidit import toy  # noqa: E402
from minidit.data import ImageFolderDataset  # noqa: E402

#: (class name, photo in ``skimage.data``) for the texture folder.
TEXTURE_SOURCES = [
    ("brick", "brick"), ("grass", "grass"), ("gravel", "gravel"), ("coffee", "coffee"), ("cat", "chelsea"),
    ("astronaut", "astronaut"), ("hubble", "hubble_deep_field"), ("ihc", "immunohistochemistry"),
    ("retina", "retina"), ("rocket", "rocket"),
]  # fmt: skip
TEXTURE_CROPS = 180
SIZE = 16


def make_digits(out: Path) -> int:
    from sklearn.datasets import load_digits

    digits = load_digits()
    for i, (img, label) in enumerate(zip(digits.images, digits.target)):
        arr = np.clip(img * (255 / 16), 0, 255).astype(np.uint8)
        pil = Image.fromarray(arr, mode="L").resize((SIZE, SIZE), Image.BILINEAR)
        folder = out / f"{label}"
        folder.mkdir(parents=True, exist_ok=True)
        pil.save(folder / f"{i:04d}.png")
    return len(digits.images)


def make_textures(out: Path, seed: int = 0) -> int:
    """Random 16x16 crops of each photo, downscaled so that the short side is 128 px (a crop shows texture)."""
    from skimage import data as skdata

    rng = np.random.default_rng(seed)
    n = 0
    for name, source in TEXTURE_SOURCES:
        pil = Image.fromarray(getattr(skdata, source)()).convert("RGB")
        scale = 128 / min(pil.size)
        pil = pil.resize((round(pil.width * scale), round(pil.height * scale)), Image.BOX)
        arr = np.asarray(pil)
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        for k in range(TEXTURE_CROPS):
            top = rng.integers(0, arr.shape[0] - SIZE + 1)
            left = rng.integers(0, arr.shape[1] - SIZE + 1)
            Image.fromarray(arr[top : top + SIZE, left : left + SIZE]).save(folder / f"{k:04d}.png")
            n += 1
    return n


# --------------------------------------------------------------------------
# The classifier trained on the real images
# --------------------------------------------------------------------------


def load_folder(folder: str) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """All images of a class-subfolder folder: x [N, 3, 16, 16] in [-1, 1], y [N], class names."""
    ds = ImageFolderDataset(folder, SIZE)
    xs, ys = zip(*(ds[i] for i in range(len(ds))))
    return torch.stack(xs), torch.tensor(ys), ds.class_names


def split(y: torch.Tensor, held_out: float = 0.2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Stratified train / held-out indices."""
    g = torch.Generator().manual_seed(seed)
    train, test = [], []
    for c in y.unique():
        idx = (y == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        k = round(len(idx) * held_out)
        test.append(idx[:k])
        train.append(idx[k:])
    return torch.cat(train), torch.cat(test)


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Shifts by up to one pixel and a little Gaussian noise (samples are slightly noisy)."""
    n = x.shape[0]
    dx, dy = torch.randint(-1, 2, (2,), generator=g).tolist()
    x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
    return x + 0.05 * torch.rand(n, 1, 1, 1, generator=g) * torch.randn(x.shape, generator=g)


def train_classifier(folder: str, out: Path, steps: int = 1500, seed: int = 0) -> dict:
    """minidit's toy CNN (``toy.ToyClassifier``, 10 classes) trained on 80% of the folder, scored on the rest."""
    x, y, names = load_folder(folder)
    if len(names) != toy.NUM_CLASSES:
        raise SystemExit(f"{folder}: {len(names)} classes; the classifier has {toy.NUM_CLASSES} outputs")
    train, test = split(y, seed=seed)
    torch.manual_seed(seed)
    net = toy.ToyClassifier(image_size=SIZE)
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    g = torch.Generator().manual_seed(seed)
    t0 = time.time()
    for _ in range(steps):
        idx = train[torch.randint(0, len(train), (128,), generator=g)]
        loss = F.cross_entropy(net(augment(x[idx], g)), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    net.eval()
    with torch.no_grad():
        acc = (net(x[test]).argmax(1) == y[test]).float().mean().item()
    torch.save({"state": net.state_dict(), "class_names": names}, out)
    return {"folder": folder, "held_out_accuracy": acc, "train": len(train), "held_out": len(test),
            "steps": steps, "seed": seed, "seconds": time.time() - t0}  # fmt: skip


def load_trained_classifier(path: str) -> tuple[toy.ToyClassifier, list[str]]:
    state = torch.load(path, weights_only=True)
    net = toy.ToyClassifier(image_size=SIZE)
    net.load_state_dict(state["state"])
    return net.eval(), state["class_names"]


# --------------------------------------------------------------------------
# Scoring a run
# --------------------------------------------------------------------------


def score(run_dir: str, classifier: str, per_class: int = 50, seed: int = 2, sample_steps: int | None = None) -> dict:
    from minidit.checkpoint import read_file
    from minidit.config import TrainConfig
    from minidit.sample import generate
    from minidit.train import build_model, describe_data, load_dataset

    run = Path(run_dir)
    ckpt = read_file(run / "checkpoints" / "last.pt")
    cfg = TrainConfig(**ckpt["config"])
    spec = describe_data(cfg, load_dataset(cfg))
    model = build_model(cfg, spec)
    model.load_state_dict(ckpt["ema"])
    net, names = load_trained_classifier(classifier)
    if names != spec.class_names:
        raise SystemExit(f"{classifier} was trained on classes {names}, the run on {spec.class_names}")
    labels = torch.arange(spec.num_classes).repeat_interleave(per_class)
    steps = sample_steps or cfg.sample_steps
    result = {"run_dir": run_dir, "step": int(ckpt["step"]), "per_class": per_class, "samples": len(labels),
              "seed": seed, "sample_steps": steps}  # fmt: skip
    for scale in (cfg.cfg_scale, 1.0):
        images = generate(
            model.eval(), labels, cfg_scale=scale, num_steps=steps, seed=seed,
            noise_schedule=cfg.noise_schedule, diffusion_steps=cfg.diffusion_steps, clip_denoised=True,
        )  # fmt: skip
        with torch.no_grad():
            pred = net(images).argmax(1)
        result[f"accuracy_cfg{scale:g}"] = (pred == labels).float().mean().item()
        toy.save_grid(images.view(spec.num_classes, per_class, *images.shape[1:])[:, :10].flatten(0, 1),
                      run / f"score_cfg{scale:g}.png", nrow=10)  # fmt: skip
    summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").is_file() else {}
    log = [json.loads(r) for r in (run / "log.jsonl").read_text().splitlines() if r.strip()]
    result["train_seconds"] = log[-1]["time"] - log[0]["time"] if len(log) > 1 else None
    result["img_per_s"] = summary.get("img_per_s")
    (run / f"score{'' if steps == cfg.sample_steps else f'-{steps}steps'}.json").write_text(
        json.dumps(result, indent=2)
    )
    return result


def report(run_dirs: list[str]) -> str:
    """A markdown table of the scored runs: data, the options that differ from the folder defaults, accuracy."""
    from minidit import config as C

    rows = ["| data | run | model | schedule | lr | EMA | flips | step | train time | samples | CFG 4 | no CFG |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for run in map(Path, run_dirs):
        if not (run / "score.json").is_file():
            continue
        s = json.loads((run / "score.json").read_text())
        cfg = C.TrainConfig(**json.loads((run / "config.json").read_text())["config"])
        minutes = f"{s['train_seconds'] / 60:.0f} min" if s.get("train_seconds") else "?"
        rows.append(
            f"| {Path(cfg.data_path).name} | {run.name} | {cfg.model} | {cfg.noise_schedule} | {cfg.lr:g} | "
            f"{cfg.ema_decay:g} | {'yes' if cfg.hflip else 'no'} | {s['step']} | {minutes} | "
            f"{s.get('samples', s['per_class'] * toy.NUM_CLASSES)} | "
            f"{s['accuracy_cfg4']:.1%} | {s['accuracy_cfg1']:.1%} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("data", help="write the digits and textures folders")
    d.add_argument("--out", required=True)
    c = sub.add_parser("classifier", help="train the CNN that scores samples, on a folder")
    c.add_argument("--folder", required=True)
    c.add_argument("--steps", type=int, default=1500)
    s = sub.add_parser("score", help="sample a run with and without CFG and classify the samples")
    s.add_argument("--run-dir", required=True)
    s.add_argument("--classifier", required=True)
    s.add_argument("--per-class", type=int, default=50)
    s.add_argument("--sample-steps", type=int, default=None, help="DDPM steps (default: the run's sample_steps)")
    r = sub.add_parser("report", help="markdown table of scored runs")
    r.add_argument("runs", nargs="+")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if args.command == "data":
        out = Path(args.out)
        print(f"digits: {make_digits(out / 'digits')} images in {out / 'digits'}")
        print(f"textures: {make_textures(out / 'textures')} images in {out / 'textures'}")
    elif args.command == "classifier":
        out = Path(args.folder.rstrip("/") + ".classifier.pt")
        result = train_classifier(args.folder, out, steps=args.steps)
        Path(str(out) + ".json").write_text(json.dumps(result, indent=2))
        print(json.dumps(result, indent=2))
    elif args.command == "score":
        print(
            json.dumps(score(args.run_dir, args.classifier, args.per_class, sample_steps=args.sample_steps), indent=2)
        )
    elif args.command == "report":
        print(report(args.runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
