"""Integer vs fake-quantized inference of calibrated bundled-model runs: per-block SQNR and the test metrics.

    python benchmarks/integer_agreement.py runs/quality/ptq4dit_w4a8 runs/quality/ditas_w4a8 [--num-samples 1000]

Each RUN is a ``default_root_dir`` where ``ditquant fit`` and ``ditquant test`` already ran (e.g. by
``benchmarks/bundled_quality.py``). Per run: the calibrated model (``RUN/quantized``) is converted to integers and
every transformer block is compared with its fake-quantized self on the same inputs — the fake model's block inputs
along the FP sampler's trajectory (8 labels, 5 of the sampler's steps); then ``ditquant test --model.backend
integer`` samples with the run's own resolved config into ``RUN-integer`` and its metrics are printed next to the
fake-quantized ones. ``--noise-floor`` also samples the fake-quantized model again with every initial noise scaled by
1 + 1e-6 (into ``RUN-perturbed``): how far the test metrics move from float rounding alone, the yardstick for the
integer model's difference (which computes the same codes with a different float summation order).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch
import yaml

from ditquant.diffusion.samplers import SamplerConfig, sample
from ditquant.integer.agreement import block_sqnr
from ditquant.export.command import load_calibrated, quantized_folder
from ditquant.integer.convert import to_integer

# ``ditquant test`` with the initial noise of every sample scaled by 1 + 1e-6 (the step noise unchanged)
PERTURBED_TEST = """
import sys
import ditquant.evaluation.sampling as sampling
from ditquant.cli import main
drawn = sampling.seeded_noise
sampling.seeded_noise = lambda indices, shape, seed, stream: drawn(indices, shape, seed, stream) * (
    1 + 1e-6 if stream == 0 else 1)
main(sys.argv[1:])
"""


def block_agreement(run: Path, sampler: SamplerConfig, steps: int = 5) -> list[float]:
    loaded, _, _ = load_calibrated(quantized_folder(run))
    fake = loaded.transformer
    integer = to_integer(fake)
    c = loaded.config
    labels = torch.arange(8) % c.num_classes
    noise = torch.randn(8, c.in_channels, c.input_size, c.input_size, generator=torch.Generator().manual_seed(0))
    visit = set(torch.linspace(0, sampler.num_steps - 1, steps).round().int().tolist())
    results: list[float] = []

    def on_step(i, t, x):
        if i in visit:
            both = torch.cat([labels, torch.full_like(labels, c.num_classes)])  # the guided batch: cond + null
            results.extend(block_sqnr(fake, integer, torch.cat([x, x]), torch.full((len(both),), t), both))

    with torch.no_grad():
        sample(fake, noise, labels, sampler, torch.Generator().manual_seed(1), on_step=on_step)
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--num-samples", type=int, default=1000)
    p.add_argument("--blocks-only", action="store_true", help="per-block SQNR only (no integer test run)")
    p.add_argument("--noise-floor", action="store_true", help="also test the fake-quantized model with its initial "
                   "noise scaled by 1 + 1e-6 (the float-rounding yardstick)")
    p.add_argument("--fp-reference", type=Path, help="an FP test folder for the integer runs' FID / PSNR vs FP "
                   "(model.evaluation.fp_reference) instead of sampling the FP model again")
    args = p.parse_args()
    rows = []

    def test_once(run: Path, config: Path, out: Path, *overrides: str, perturbed: bool = False) -> dict:
        """``ditquant test`` of ``run``'s checkpoint with its own config and ``overrides`` into ``out`` (once)."""
        if not (out / "test" / "metrics.json").is_file():
            command = ["-c", PERTURBED_TEST] if perturbed else ["-m", "ditquant"]
            subprocess.run([sys.executable, *command, "test", "--config", str(config),
                            "--trainer.default_root_dir", str(out), "--ckpt_path",
                            str(run / "checkpoints" / "last.ckpt"), "--data.num_test_samples", str(args.num_samples),
                            "--trainer.enable_progress_bar", "false", *overrides,
                            *(["--model.evaluation.fp_reference", str(args.fp_reference)] if args.fp_reference else [])],
                           check=True)
        return json.loads((out / "test" / "metrics.json").read_text())

    for run in args.runs:
        config = run / "test" / "config.yaml"
        resolved = yaml.safe_load(config.read_text()) if config.is_file() else {"model": {"sampler": {}}}
        sqnr = block_agreement(run, SamplerConfig(**resolved["model"]["sampler"]))
        if args.blocks_only:
            print(f"{run.name}: block SQNR min {min(sqnr):.1f} dB, mean {sum(sqnr) / len(sqnr):.1f} dB over "
                  f"{len(sqnr)} block calls")
            continue
        fake = json.loads((run / "test" / "metrics.json").read_text())
        integer = test_once(run, config, run.parent / f"{run.name}-integer", "--model.backend", "integer")
        perturbed = (test_once(run, config, run.parent / f"{run.name}-perturbed", perturbed=True)
                     if args.noise_floor else None)
        rows.append((run.name, min(sqnr), sum(sqnr) / len(sqnr), fake, integer, perturbed))
    if not rows:
        return
    print(f"\n{args.num_samples} samples; block SQNR over {len(sqnr)} block calls per run\n")
    floor = args.noise_floor
    print("| run | block SQNR min / mean (dB) | FID vs data fake / integer (difference) "
          + ("| FID vs data, fake with noise × (1 + 1e-6) (difference) " if floor else "")
          + "| FID vs FP fake / integer | PSNR vs FP fake / integer (dB) |")
    print("|---|---|---|" + ("---|" if floor else "") + "---|---|")
    for name, lo, mean, f, i, q in rows:
        perturbed = f" {q['fid_vs_data']:.3f} ({q['fid_vs_data'] - f['fid_vs_data']:+.3f}) |" if floor else ""
        print(f"| {name} | {lo:.1f} / {mean:.1f} | {f['fid_vs_data']:.3f} / {i['fid_vs_data']:.3f} "
              f"({i['fid_vs_data'] - f['fid_vs_data']:+.3f}) |{perturbed} {f['fid_vs_fp']:.3f} / {i['fid_vs_fp']:.3f} "
              f"| {f['psnr_vs_fp']:.2f} / {i['psnr_vs_fp']:.2f} |")


if __name__ == "__main__":
    main()
