"""Time sampling of the bundled model: N images, DDPM with guidance, on this machine's CPU threads.

    python benchmarks/bundled_sampling.py --num-samples 1000 --steps 50 --cfg-scale 1.5
"""

from __future__ import annotations

import argparse
import time

import torch

from ditquant.diffusion.samplers import SamplerConfig, sample
from ditquant.evaluation.sampling import seeded_noise, step_generators
from ditquant.models.loading import DiTSource, load_dit


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-samples", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--cfg-scale", type=float, default=1.5)
    args = p.parse_args()
    loaded = load_dit(DiTSource("bundled"))
    c = loaded.config
    config = SamplerConfig(kind="ddpm", num_steps=args.steps, cfg_scale=args.cfg_scale)
    start = time.perf_counter()
    for first in range(0, args.num_samples, args.batch_size):
        idx = torch.arange(first, min(first + args.batch_size, args.num_samples))
        noise = seeded_noise(idx, (c.in_channels, c.input_size, c.input_size), 0, 0)
        sample(loaded.transformer, noise, idx % c.num_classes, config, step_generators(idx, 0, noise.device))
    elapsed = time.perf_counter() - start
    print(f"{args.num_samples} images, DDPM {args.steps} steps, cfg {args.cfg_scale}, "
          f"{torch.get_num_threads()} threads: {elapsed:.1f} s ({elapsed / args.num_samples * 1000:.1f} ms/image)")


if __name__ == "__main__":
    main()
