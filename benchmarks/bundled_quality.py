"""Quality table of the bundled model: FP and each quantization config, measured by ``ditquant fit/test``.

    python benchmarks/bundled_quality.py configs/rtn_w8a8.yaml configs/rtn_w4a8.yaml [--num-samples 1000]
    python benchmarks/bundled_quality.py configs/ptq4dit_w4a8.yaml+configs/ablations/ptq4dit_csb_mid.yaml
    python benchmarks/bundled_quality.py --model configs/models/mini-pixart.yaml configs/rtn_w8a8.yaml  # mini PixArt

A row may compose configs with ``+`` (an ablation overlay after its method config); it is named after the last one.
``--model`` puts a model config in front of every row (the FP row included), as ``ditquant fit --config MODEL
--config METHOD`` does; the method configs then override its settings as they override the bundled DiT's defaults.
``--after`` puts a config after every quantized row's configs: the model config again, for a method config that
sets its own sampler (Q-DiT's DDIM 50) where the table wants the model's protocol for every row.

Runs ``ditquant test --config configs/fp.yaml`` and, per config, ``ditquant fit`` then ``ditquant test``, each in
``runs/quality/<name>``; prints a markdown table of FID vs data, FID vs FP, PSNR vs FP and calibration time
(activation observation + reconstruction, from ``quantized/fit_summary.json``; the shared calibration set is
recorded once beforehand and not counted). All sampling is seeded (evaluation seed 0, sample i gets noise (0, i)); the
sampler is the config's. The FP row's samples are the FP reference of every other row
(``model.evaluation.fp_reference``), so the FP model is sampled once per table, not once per row.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path


def ditquant(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "ditquant", *args], check=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("configs", nargs="+", help="config files, or a+b to compose them (named after the last)")
    p.add_argument("--num-samples", type=int, default=1000)
    p.add_argument("--out", type=Path, default=Path("runs/quality"))
    p.add_argument("--reuse", action="store_true", help="keep configs whose metrics.json exists (resume a table)")
    p.add_argument("--fp", default="configs/fp.yaml",
                   help="the FP row; e.g. configs/qdit_w4a8.yaml+configs/fp.yaml for the FP model under Q-DiT's "
                        "sampler (DDIM 50)")
    p.add_argument("--model", default=None, help="a model config in front of every row (default: the bundled DiT)")
    p.add_argument("--after", default=None,
                   help="a config after every quantized row's configs (e.g. the model config, to keep its sampler)")
    args = p.parse_args()

    rows = []
    for i, row in enumerate([args.fp, *args.configs]):
        configs = [Path(c) for c in row.split("+")]
        name = "fp" if i == 0 else configs[-1].stem
        configs = [Path(args.model), *configs] if args.model else configs
        configs = [*configs, Path(args.after)] if args.after and name != "fp" else configs
        root = args.out / name
        common = [*(arg for c in configs for arg in ("--config", str(c))), "--trainer.default_root_dir", str(root),
                  "--data.num_test_samples", str(args.num_samples), "--trainer.enable_progress_bar", "false"]
        if not (args.reuse and (root / "test" / "metrics.json").is_file()):
            if name != "fp":
                ditquant("fit", *common)
            ditquant("test", *common, *([] if name == "fp" else
                                        ["--model.evaluation.fp_reference", str(args.out / "fp" / "test")]))
        metrics = json.loads((root / "test" / "metrics.json").read_text())
        fit_s = (None if name == "fp" else
                 json.loads((root / "quantized" / "fit_summary.json").read_text())["fit_seconds"])
        rows.append((name, metrics, fit_s))

    sampler = rows[0][1]["sampler"]
    print(f"\n{args.num_samples} samples, {sampler['kind']} {sampler['num_steps']} steps, cfg {sampler['cfg_scale']}, "
          "seed 0\n")
    print("| config | FID vs data | FID vs FP | PSNR vs FP (dB) | class accuracy | calibration time (s) |")
    print("|---|---|---|---|---|---|")
    fmt = lambda v, f="{:.2f}": "–" if v is None else f.format(v)  # noqa: E731
    for name, m, fit_s in rows:
        accuracy = m.get("class_accuracy")
        print(f"| {name} | {fmt(m.get('fid_vs_data'))} | {fmt(m.get('fid_vs_fp'))} | {fmt(m.get('psnr_vs_fp'))} "
              f"| {fmt(None if accuracy is None else 100 * accuracy, '{:.1f} %')} | {fmt(fit_s, '{:.0f}')} |")


if __name__ == "__main__":
    main()
