"""Every notebook runs top to bottom (code cells executed in one namespace; fewer sampling steps for speed)."""

import json
from pathlib import Path

import pytest

from ditquant.models.bundled import DIT_DIR

NOTEBOOKS = sorted(Path("notebooks").glob("*.ipynb"))


@pytest.mark.skipif(not (DIT_DIR / "config.json").is_file(), reason="bundled model not trained yet")
@pytest.mark.parametrize("path", NOTEBOOKS, ids=str)
def test_notebook_runs(path):
    cells = json.loads(path.read_text())["cells"]
    namespace: dict = {}
    for cell in cells:
        if cell["cell_type"] == "code":
            source = "".join(cell["source"]).replace("num_steps=50", "num_steps=10").replace("iterations=100",
                                                                                              "iterations=20")
            exec(compile(source, f"{path}:{cell['id']}", "exec"), namespace)
    CHECKS[path.stem](namespace)


def check_quickstart(ns: dict) -> None:
    assert ns["psnr"] > 12  # reconstructed W4A8 stays close to FP sample by sample
    assert ns["psnr"] > ns["psnr_vs_fp"](ns["rtn"]) - 1.0  # and does not fall behind RTN


def check_integer_inference(ns: dict) -> None:
    assert ns["min_block_sqnr"] > 40  # the loaded integer model reproduces fake quantization block by block
    assert ns["integer_images"].shape == ns["fp_images"].shape
    assert ns["speedup"]["bare _int_mm"] > 0 and set(ns["speedup"]) >= {"fp32", "bf16", "integer layer"}


CHECKS = {"quickstart": check_quickstart, "integer_inference": check_integer_inference}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=str)
def test_notebooks_use_only_the_public_api(path):
    sources = ["".join(c["source"]) for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
    deep = [line for s in sources for line in s.splitlines() if "ditquant." in line and "import" in line]
    assert not deep, deep  # `from ditquant import ...` only
