"""Toy accuracy against sampling steps: the shipped DDPM toy DiT vs a ``--objective flow`` toy run (issue 14, item 2).

Both are the default toy recipe (DiT-Ti/4, 16 px, cosine schedule for DDPM, lr 2e-3, batch 64, EMA 0.995,
6,000 steps, seed 0); only the objective differs. The DDPM model is ``data/toy_dit.safetensors`` (the
default toy run's EMA weights, stored in fp16).

    OMP_NUM_THREADS=1 python -m minidit.train --objective flow --run-dir /tmp/flowtoy
    python benchmarks/flow_vs_ddpm.py /tmp/flowtoy --samples 300 --out /tmp/flow_vs_ddpm.json
    python benchmarks/flow_vs_ddpm.py data/toy_flow_dit.safetensors --steps 25 --scales 1,1.5,2,3,4  # guidance sweep

For each sampler and step count it draws ``--samples`` images (classes 0..9 in turn, seed 1) with CFG 4 and
without, and scores them with the shipped toy classifier (``evaluate.toy_metrics``: accuracy, and the
Fréchet distance of the classifier's features to fresh toy images).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minidit import toy  # noqa: E402
from minidit.evaluate import toy_metrics  # noqa: E402
from minidit.sample import generate, load_for_sampling  # noqa: E402

STEPS = (5, 10, 25, 50, 100)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("flow_run", help="run directory of a --objective flow toy run, or data/toy_flow_dit.safetensors")
    p.add_argument("--samples", type=int, default=300)
    p.add_argument("--out", default="flow_vs_ddpm.json")
    p.add_argument("--steps", default=",".join(map(str, STEPS)), help="sampling steps, comma-separated")
    p.add_argument("--scales", default="4,1", help="guidance scales, comma-separated (1: no guidance)")
    args = p.parse_args()
    steps_list = [int(v) for v in args.steps.split(",")]
    scales = [float(v) for v in args.scales.split(",")]
    ddpm, ddpm_cfg = toy.load_toy_dit()
    flow, info = load_for_sampling(args.flow_run)
    labels = torch.arange(args.samples) % toy.NUM_CLASSES
    models = [("ddpm", ddpm, ddpm_cfg, ("ddpm", "ddim"))]
    models.append(("flow", flow.eval(), info["train_config"], ("euler", "heun")))
    rows = []
    for name, model, cfg, samplers in models:
        for sampler in samplers:
            for steps in steps_list:
                for scale in scales:
                    t0 = time.time()
                    images = generate(
                        model, labels, cfg_scale=scale, num_steps=steps, sampler=sampler, seed=1,
                        noise_schedule=cfg["noise_schedule"], diffusion_steps=cfg["diffusion_steps"],
                        objective=cfg.get("objective", "ddpm"), clip_denoised=True,
                    )  # fmt: skip
                    m = toy_metrics(images, labels)
                    rows.append(dict(objective=name, sampler=sampler, steps=steps, cfg=scale, accuracy=m["accuracy"],
                                     frechet_toy=m["frechet_toy"], seconds=time.time() - t0))  # fmt: skip
                    print(json.dumps(rows[-1]), flush=True)
    Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
