"""Try every bad input the reliability issue lists (and more) on the bundled model; print what each one answers.

    python scripts/bad_inputs.py            # a markdown table: input, exit status, message (about 1 minute, 2 cores)

Each case runs ``ditquant`` in-process in a scratch folder. The option cases are the ones ``tests/test_reliability.py``
asserts; the file cases build the broken file first (a NaN weight, a pickled checkpoint, a tampered artifact, ...).
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.chdir(Path(__file__).resolve().parents[1])

from ditquant.cli import main  # noqa: E402
from ditquant.models.bundled import DIT_DIR  # noqa: E402
from tests.cli_helpers import small_run  # noqa: E402
from tests.test_reliability import BAD_OPTIONS  # noqa: E402


def answer(*args: str) -> tuple[int, str]:
    """Exit status and message: the SystemExit text, or else the last line ditquant / the parser wrote to stderr."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            main(list(args))
    except SystemExit as e:
        if isinstance(e.code, str):
            return 1, e.code
        lines = [ln for ln in err.getvalue().splitlines() if ln.strip() and not ln.startswith(("INFO", "usage"))]
        said = [ln for ln in lines if ln.startswith(("ditquant", "error:"))]
        return int(e.code or 0), (said or lines or [""])[-1].strip()
    return 0, ""


class Payload:
    def __reduce__(self):
        return (os.system, ("echo this should never run",))


def cases(tmp: Path):
    calib = tmp / "calib"

    def small(config: str, root: str, *extra: str) -> list[str]:
        return small_run(config, tmp / root, calib, 8, 8, *extra)

    for args, _ in BAD_OPTIONS:
        yield "fit " + " ".join(args), ["fit", "--config", "configs/rtn_w8a8.yaml", "--trainer.default_root_dir",
                                        str(tmp / "opt"), *args]

    yield "a config file that does not exist", ["fit", "--config", "configs/nope.yaml"]
    yield "model.dit.source: a file that does not exist", ["fit", *small("configs/rtn_w8a8.yaml", "a"),
                                                           "--model.dit.source", str(tmp / "DiT-XL-2-256x256.pt")]
    empty = tmp / "empty_folder"
    empty.mkdir()
    yield "model.dit.source: a folder without a model", ["fit", *small("configs/rtn_w8a8.yaml", "b"),
                                                         "--model.dit.source", str(empty)]
    for where in ("one", "all"):
        folder = tmp / f"nan_{where}"
        shutil.copytree(DIT_DIR, folder)
        state = load_file(folder / "diffusion_pytorch_model.safetensors")
        for name in (["transformer_blocks.2.attn1.to_q.weight"] if where == "one" else list(state)):
            state[name] = torch.full_like(state[name], float("nan"))
        save_file(state, folder / "diffusion_pytorch_model.safetensors")
        yield f"weights with NaN ({where} tensor{'s' if where == 'all' else ''}), fit", [
            "fit", *small("configs/rtn_w8a8.yaml", f"nan{where}"), "--model.dit.source", str(folder)]
    yield "weights with NaN, FP test (segfaulted before)", ["test", "--config", "configs/fp.yaml", "--model.dit.source",
                                                            str(tmp / "nan_all"), "--trainer.default_root_dir",
                                                            str(tmp / "fp")]
    a_file = tmp / "a_file"
    a_file.write_text("")
    yield "trainer.default_root_dir is a file", ["fit", "--config", "configs/rtn_w8a8.yaml",
                                                 "--trainer.default_root_dir", str(a_file)]
    yield "data.cache_dir below a file", ["fit", *small("configs/rtn_w8a8.yaml", "c"), "--data.cache_dir",
                                          str(a_file / "calib")]
    yield "--ckpt_path: no such file", ["fit", *small("configs/rtn_w8a8.yaml", "d"), "--ckpt_path",
                                        str(tmp / "no.ckpt")]
    yield "--ckpt_path last without a checkpoint", ["fit", *small("configs/rtn_w8a8.yaml", "e"), "--ckpt_path",
                                                    "last"]
    yield "test before any fit", ["test", *small("configs/rtn_w8a8.yaml", "f")]

    # a partial W4A8 fit (max_steps), then everything that must refuse it
    partial = small("configs/qdiff_w4a8.yaml", "partial", "--model.reconstruction.iterations", "4",
                    "--model.reconstruction.activation_iterations", "2")
    yield "fit stopped by --trainer.max_steps 3", ["fit", *partial, "--trainer.max_steps", "3"]
    yield "test a partial checkpoint", ["test", *partial]
    yield "export a partial run", ["export", str(tmp / "partial")]
    yield "fit again in a folder holding a checkpoint", ["fit", *partial]
    yield "test a W4A8 checkpoint with a W8 config", ["test", *partial, "--model.quant.weight.bits", "8"]
    yield "test a W4A8 checkpoint with symmetric weights", ["test", *partial, "--model.quant.weight.symmetric", "true"]
    yield "test a checkpoint with model.dit.use_ema changed", ["test", *partial, "--model.dit.use_ema", "false"]
    yield "resume a fit with another reconstruction.iterations", ["fit", *partial, "--ckpt_path", "last",
                                                                  "--model.reconstruction.iterations", "5"]
    yield "resume a fit with another calibration recipe", ["fit", *partial, "--ckpt_path", "last",
                                                           "--data.samples_per_timestep", "3"]
    retrained = tmp / "retrained"
    shutil.copytree(DIT_DIR, retrained)
    state = load_file(retrained / "diffusion_pytorch_model.safetensors")
    state["proj_out_2.bias"] = state["proj_out_2.bias"] + 1e-3
    save_file(state, retrained / "diffusion_pytorch_model.safetensors")
    yield "test a checkpoint against other FP weights", ["test", *partial, "--model.dit.source", str(retrained)]

    evil = tmp / "evil.ckpt"
    torch.save({"state_dict": {}, "payload": Payload()}, evil)
    yield "a checkpoint holding a pickle payload", ["test", *small("configs/rtn_w8a8.yaml", "g"), "--ckpt_path",
                                                    str(evil)]
    yield "--weights_only false", ["test", *small("configs/rtn_w8a8.yaml", "g"), "--ckpt_path", str(evil),
                                   "--weights_only", "false"]
    garbage = tmp / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint" * 100)
    yield "a checkpoint that is not one (garbage bytes)", ["test", *small("configs/rtn_w8a8.yaml", "h"),
                                                           "--ckpt_path", str(garbage)]

    # a finished W8A8 fit, then its artifacts broken in each way
    done = small("configs/rtn_w8a8.yaml", "done")
    yield "(setup) a finished RTN W8A8 fit — exit 0 expected", ["fit", *done]
    yield "model.load_quantized: no such folder", ["test", *done, "--model.load_quantized", str(tmp / "nothing")]
    yield "model.load_quantized with another quant config", ["test", *done, "--model.load_quantized",
                                                             str(tmp / "done" / "quantized"),
                                                             "--model.quant.activation.bits", "6"]
    tampered = tmp / "tampered"
    yield "(setup) export the finished run — exit 0 expected", ["export", str(tmp / "done"), "--out", str(tampered)]
    yield "export a folder that is not a run", ["export", str(empty)]
    yield "model.load_integer: an export with one tensor deleted", ["test", *done, "--model.load_integer",
                                                                    str(tampered)]
    yield "model.load_integer: an export whose write never committed (no manifest)", [
        "test", *done, "--model.load_integer", str(tmp / "uncommitted")]
    yield "model.load_quantized: a calibrated model with 4 KiB zeroed", [
        "test", *done, "--model.load_quantized", str(tmp / "zeroed")]
    yield "a cached calibration file with 4 KiB zeroed", ["fit", *small("configs/rtn_w8a8.yaml", "i")]
    yield "Q-DiT search with fid_features none (before recording)", [
        "fit", *small("configs/qdit_w4a8.yaml", "j"), "--model.evaluation.fid_features", "none"]
    yield "a YAML that does not parse", ["fit", "--config", str(tmp / "broken.yaml")]
    yield "an unknown option", ["fit", "--config", "configs/rtn_w8a8.yaml", "--model.quant.bitz", "4"]
    yield "an option of the wrong type", ["fit", "--config", "configs/rtn_w8a8.yaml", "--model.quant.weight.bits",
                                          "four"]


def prepare(name: str, tmp: Path) -> None:
    """Break a file just before the case that needs it broken."""
    if name.startswith("model.load_integer: an export with one tensor"):
        state = load_file(tmp / "tampered" / "model.safetensors")
        state.pop(sorted(state)[0])
        save_file(state, tmp / "tampered" / "model.safetensors")
        shutil.copytree(tmp / "tampered", tmp / "uncommitted")
        (tmp / "uncommitted" / "manifest.json").unlink()
    if name.startswith("model.load_quantized: a calibrated model with 4 KiB"):
        shutil.copytree(tmp / "done" / "quantized", tmp / "zeroed")
        _zero(tmp / "zeroed" / "model.safetensors")
    if name.startswith("a cached calibration file"):
        for f in (tmp / "calib").glob("calib-*.safetensors"):
            _zero(f)
    if name.startswith("a YAML that does not parse"):
        (tmp / "broken.yaml").write_text("model: [unclosed\n")


def _zero(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    start = len(raw) // 2
    raw[start:start + 4096] = bytes(4096)
    path.write_bytes(bytes(raw))


if __name__ == "__main__":
    sys.argv = ["ditquant"]
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        rows = []
        for i, (name, args) in enumerate(cases(tmp), 1):
            prepare(name, tmp)
            code, message = answer(*args)
            rows.append((i, name, code, message.replace(str(tmp), "<tmp>").replace("|", "\\|")))
            print(f"{i}: exit {code}: {name}", file=sys.stderr)
    print("| # | input | exit | message |\n|---|---|---|---|")
    for i, name, code, message in rows:
        print(f"| {i} | {name} | {code} | {message} |")
