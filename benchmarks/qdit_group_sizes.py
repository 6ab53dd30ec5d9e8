"""The group sizes a Q-DiT granularity search chose, one row per block, and the search's progress.

    python benchmarks/qdit_group_sizes.py runs/quality_qdit/qdit_w4a8

Reads ``<run>/quantized/fit_summary.json`` (written by ``ditquant fit`` with the GranularitySearch callback) and
prints markdown: the chosen g of q/k/v, attention output, fc1 and fc2 per block, then per generation the best
fitness FID so far and the population's best and mean.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

COLUMNS = {"attn1.to_qkv": "q/k/v", "attn1.to_out.0": "attention out", "ff.net.0.proj": "fc1", "ff.net.2": "fc2"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path, help="a fit's default_root_dir")
    args = p.parse_args()
    summary_path = args.run / "quantized" / "fit_summary.json"
    if not summary_path.is_file():
        raise SystemExit(f"{summary_path} not found: run `ditquant fit` with a GranularitySearch callback first")
    search = json.loads(summary_path.read_text())["preprocessing"].get("granularity_search")
    if not search or "gene_sizes" not in search:
        raise SystemExit(f"{summary_path}: no granularity search result in it")
    blocks: dict[int, dict[str, int]] = {}
    for key, g in search["gene_sizes"].items():
        m = re.fullmatch(r"transformer_blocks\.(\d+)\.(.+)", key)
        if m and m.group(2) in COLUMNS:
            blocks.setdefault(int(m.group(1)), {})[COLUMNS[m.group(2)]] = g
    print(f"search: {search['evaluated']} candidates, {search['generations']} generations, {search['seconds']:.0f} s; "
          f"best fitness FID {search['best_fid']:.3f}; {search['constraint']} cost {search['cost']:.0f} <= budget "
          f"{search['budget']:.0f}\n")
    print("| block | " + " | ".join(COLUMNS.values()) + " |")
    print("|---" * (len(COLUMNS) + 1) + "|")
    for b in sorted(blocks):
        print(f"| {b} | " + " | ".join(str(blocks[b].get(c, "–")) for c in COLUMNS.values()) + " |")
    print("\n| generation | best so far | population best | population mean |\n|---|---|---|---|")
    for h in search["history"]:
        print(f"| {h['generation']} | {h['best']:.3f} | {h['population_best']:.3f} | {h['population_mean']:.3f} |")


if __name__ == "__main__":
    main()
