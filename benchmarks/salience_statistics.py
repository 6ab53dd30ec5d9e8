"""What PTQ4DiT's salience balancing does to the bundled model's balanced layers, measured on its calibration set.

    python benchmarks/salience_statistics.py [--rows-per-timestep 8]

Uses the bundled config's calibration set (25 timesteps x 32 samples, DDPM 50 steps, cfg 1.5, seed 0; recorded
into runs/calibration if missing). For each balanced input (q/k/v's, the attention output's, fc1's), averaged
over the 8 blocks, it prints:

- Spearman ρ between activation and weight salience per timestep (range over timesteps) and the spread of the
  SSC weights η = softmax(−ρ) (max/min);
- the salience outlier ratio max_j s_j / median_j s_j of activations and weights, before and after balancing;
- the layer output SQNR (dB) of round-to-nearest quantization (weights per output channel, activations per tensor,
  min–max) on held-in calibration inputs, for W4A8 and W8A8, with the W4 weight-only and A8 activation-only parts:
  no balancing, CSB from the middle timestep, CSB + SSC.
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import torch
from torch.utils.data import DataLoader, Subset

from ditquant.api import calibration_set
from ditquant.calibration.dataset import collate_pairs
from ditquant.diffusion.samplers import SamplerConfig
from ditquant.methods.balancing import balancing_factors, fold_balancing, salience_per_timestep
from ditquant.models.folding import input_weights
from ditquant.methods.salience import activation_salience, spearman, weight_salience
from ditquant.models.layout import BALANCED_INPUTS, transformer_blocks
from ditquant.models.loading import DiTSource, load_dit
from ditquant.quant.quantizer import quantize_tensor
from ditquant.quant.spec import QuantSpec

VARIANTS = ("none", "mid", "ssc")


@torch.no_grad()
def captured_inputs(model, calibration) -> dict[tuple[int, str], torch.Tensor]:
    """(block, input) -> every token row the balanced linears read over ``calibration``."""
    seen = defaultdict(list)
    handles = [block.get_submodule(consumers[0]).register_forward_pre_hook(
        lambda m, a, key=(b, name): seen[key].append(a[0].reshape(-1, a[0].shape[-1])))
        for b, block in enumerate(transformer_blocks(model)) for name, consumers in BALANCED_INPUTS.items()]
    for batch in DataLoader(calibration, batch_size=32, collate_fn=collate_pairs):
        model(batch["x"], batch["t"], batch["y"])
    for h in handles:
        h.remove()
    return {k: torch.cat(v) for k, v in seen.items()}


def sqnr_db(ref: torch.Tensor, approx: torch.Tensor) -> float:
    return 10 * torch.log10(ref.pow(2).sum() / (ref - approx).pow(2).sum()).item()


def outlier_ratio(s: torch.Tensor) -> float:
    return (s.max() / s.median()).item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows-per-timestep", type=int, default=8, help="calibration samples per timestep for the SQNR")
    args = p.parse_args()

    source = DiTSource()
    calibration = calibration_set(load_dit(source), SamplerConfig(kind="ddpm", num_steps=50, cfg_scale=1.5),
                                  num_timesteps=25, samples_per_timestep=32)
    held_in = Subset(calibration, [t * calibration.per_timestep + j for t in range(calibration.num_timesteps)
                                   for j in range(args.rows_per_timestep)])
    w4, w8, a8 = (QuantSpec(bits=4, granularity="channel"), QuantSpec(bits=8, granularity="channel"),
                  QuantSpec(bits=8))
    rows = defaultdict(lambda: defaultdict(list))  # input -> statistic -> values over blocks

    fp = load_dit(source).transformer.eval()
    timesteps, per_t = salience_per_timestep(fp, calibration)
    for b, block in enumerate(transformer_blocks(fp)):
        for name, consumers in BALANCED_INPUTS.items():
            sw = weight_salience([block.get_submodule(c).weight for c in consumers])
            rho = torch.tensor([spearman(s, sw) for s in per_t[(b, name)]])
            eta = torch.softmax(-rho, 0)
            rows[name]["rho min"].append(rho.min().item())
            rows[name]["rho max"].append(rho.max().item())
            rows[name]["eta max/min"].append((eta.max() / eta.min()).item())

    for variant in VARIANTS:
        model = load_dit(source).transformer.eval()
        if variant != "none":
            factors, _ = balancing_factors(model, calibration, salience=variant)
            fold_balancing(model, factors)
        xs = captured_inputs(model, held_in)
        for (b, name), x in xs.items():
            w = input_weights(transformer_blocks(model)[b], BALANCED_INPUTS[name])
            stats = rows[name]
            if variant in ("none", "ssc"):
                stats[f"X outliers {variant}"].append(outlier_ratio(activation_salience(x)))
                stats[f"W outliers {variant}"].append(outlier_ratio(w.abs().amax(0)))
            y, xq = x @ w.T, quantize_tensor(x, a8, False)
            stats[f"W4A8 {variant}"].append(sqnr_db(y, xq @ quantize_tensor(w, w4, True).T))
            stats[f"W4 only {variant}"].append(sqnr_db(y, x @ quantize_tensor(w, w4, True).T))
            stats[f"A8 only {variant}"].append(sqnr_db(y, xq @ w.T))
            stats[f"W8A8 {variant}"].append(sqnr_db(y, xq @ quantize_tensor(w, w8, True).T))

    mean = {name: {k: sum(v) / len(v) for k, v in stats.items()} for name, stats in rows.items()}
    print(f"\nbundled model, calibration {calibration.num_timesteps} timesteps x {calibration.per_timestep} "
          f"(SQNR on {args.rows_per_timestep} per timestep), means over {len(transformer_blocks(fp))} blocks\n")
    print("| input | ρ range | η max/min | act. outliers (none → SSC) | weight outliers (none → SSC) |")
    print("|---|---|---|---|---|")
    for name, m in mean.items():
        print(f"| {name} | {m['rho min']:.2f} … {m['rho max']:.2f} | {m['eta max/min']:.2f} "
              f"| {m['X outliers none']:.1f} → {m['X outliers ssc']:.1f} "
              f"| {m['W outliers none']:.1f} → {m['W outliers ssc']:.1f} |")
    print("\nlayer output SQNR (dB), none / CSB mid / CSB+SSC\n")
    print("| input | W4A8 | W4 weights only | A8 activations only | W8A8 |")
    print("|---|---|---|---|---|")
    for name, m in mean.items():
        cells = [" / ".join(f"{m[f'{kind} {v}']:.1f}" for v in VARIANTS)
                 for kind in ("W4A8", "W4 only", "A8 only", "W8A8")]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
