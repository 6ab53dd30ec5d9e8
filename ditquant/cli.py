"""``ditquant fit | test`` (and ``ditquant export``, see ``ditquant.export.command``): LightningCLI over DiTQuantization + CalibrationData, configured by YAML.

Configs compose by repeating ``--config`` (e.g. a model config, then a method config). ``test`` without
``--ckpt_path`` uses ``<trainer.default_root_dir>/checkpoints/last.ckpt`` written by ``fit``.

Exit status (README, "Exit codes"): 0 done; 1 bad input (one line, ``ditquant: error: …``) or an internal error
(with its traceback); 2 a command line the parser rejects; 3 a fit that ended before its last unit (``max_steps``,
``max_time``: no calibrated model is written); 130 / 143 stopped by SIGINT / SIGTERM at a safe point (a fit saves
``last.ckpt`` first).
"""

from __future__ import annotations

import importlib
import logging
import os
import re
import shlex
import sys
import typing
from pathlib import Path

from jsonargparse import Namespace
from jsonargparse.typing import register_type
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.exceptions import SIGTERMException

from ditquant import console, interrupt
from ditquant.datamodule import CalibrationData
from ditquant.checkpointing import AtomicCheckpointIO, FitCheckpoint
from ditquant.errors import Interrupted, StoppedEarly, UserError
from ditquant.options import build
from ditquant.io import InputPath, atomic_write, check_writable_dir, resolve_input_path
from ditquant.callbacks import MethodCallback
from ditquant.methods import METHODS, check_order
from ditquant.task import DiTQuantization

USER_ERRORS = (UserError, FileNotFoundError, ConnectionError)
EXIT_INCOMPLETE = 3

# A relative path inside a YAML (model source, VAE, a saved model) is looked up next to that YAML first.
register_type(InputPath, str, resolve_input_path)

class OneLineErrorParser(LightningArgumentParser):
    """jsonargparse's parser, whose errors (an unknown option, a value of the wrong type, a YAML that does not parse)
    are one line naming the full option path instead of a dump of every type it tried."""

    def error(self, message: str, ex=None):
        if not self.exit_on_error or os.environ.get("DITQUANT_DEBUG"):
            return super().error(message, ex)  # jsonargparse trying alternatives, or asked for everything
        moved = re.search(r"ditquant\.methods\.callbacks\.\w+", message)
        hint = _moved_method(moved.group(0)) if moved else ""
        sys.stderr.write(f"ditquant: error: {condense_parser_error(message)}{hint} (`ditquant fit --help` lists the "
                         "options)\n")
        sys.exit(2)


def condense_parser_error(message: str) -> str:
    """``Parser key "model.quant": … Parser key "weight.bits": Expected a <class 'int'>. Got value: four`` ->
    ``model.quant.weight.bits: Expected a <class 'int'>. Got value: four``."""
    keys, detail = [], None
    for line in (raw.strip().lstrip("- ") for raw in message.splitlines()):
        key = re.match(r'Parser key "([^"]+)":\s*(.*)', line)
        if key:
            keys.append(key.group(1))
            detail = key.group(2) or None
            if detail:
                break
            continue
        if not line or line.startswith(("Does not validate", "Subtypes:", "Errors:", "Problem with given class_path",
                                        "Expected a <class 'NoneType'>", "Given value")):
            continue
        detail = line
        break
    detail = detail or message.strip().splitlines()[0]
    return f"{'.'.join(keys)}: {detail}" if keys else detail


class DitQuantCLI(LightningCLI):
    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {"fit": {"model", "train_dataloaders", "val_dataloaders", "datamodule"},
                "test": {"model", "dataloaders", "datamodule"}}

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(FitCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.save_top_k": 0,
                             "checkpoint.enable_version_counter": False})
        parser.link_arguments("trainer.default_root_dir", "checkpoint.dirpath",
                              compute_fn=lambda root: str(Path(root) / "checkpoints"))
        parser.add_argument("--overwrite", type=bool, default=False,
                            help="fit: start over in a run folder that already holds a checkpoint (its checkpoint "
                                 "and calibrated model are replaced)")

    def _parse_ckpt_path(self) -> None:
        # LightningCLI reads hyperparameters out of --ckpt_path here, with a raw torch.load; ditquant saves none (the
        # command's config is the config) and reads checkpoints only through AtomicCheckpointIO, which refuses
        # pickled objects in one line.
        return

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand]
        if config.get("weights_only") is False:
            raise UserError("--weights_only false is not supported: ditquant loads checkpoints with "
                            "weights_only=True only (a checkpoint never runs code)")
        _validate_dataclasses(DiTQuantization.__init__, config.model, "model")
        _validate_callbacks(config.trainer.get("callbacks"))
        root = Path(config.trainer.default_root_dir)
        check_writable_dir(root, "trainer.default_root_dir")
        if self.subcommand == "fit":
            check_writable_dir(Path(config.data.cache_dir), "data.cache_dir")

    def _instantiate_trainer(self, config: dict, callbacks: list):
        # A rich bar on a terminal; periodic log lines in a batch job's log (a bar there is a wall of escapes).
        if config.get("enable_progress_bar") is not False and console.on_terminal():  # None: Trainer default
            callbacks = [*callbacks, console.FitProgressBar()]
        else:
            config = {**config, "enable_progress_bar": False}
            callbacks = [*callbacks, console.ProgressLines()]
        return super()._instantiate_trainer(config, callbacks)

    def instantiate_trainer(self, **kwargs):
        trainer = super().instantiate_trainer(**kwargs)
        trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        return trainer

    def before_fit(self) -> None:
        config = self.config_init[self.subcommand]
        last = Path(self.trainer.default_root_dir) / "checkpoints" / "last.ckpt"
        ckpt = config.get("ckpt_path")
        if ckpt == "last":
            if not last.is_file():
                raise UserError(f"--ckpt_path last: there is no checkpoint to resume at {last} (start the fit "
                                "without --ckpt_path)")
            config["ckpt_path"] = str(last)
        elif ckpt is None and last.is_file():
            if not config.get("overwrite"):
                raise UserError(f"{self.trainer.default_root_dir} already holds a fit checkpoint ({last}): resume it "
                                "with --ckpt_path last, or start over with --overwrite true")
            last.unlink()  # --overwrite: this fit replaces the folder's checkpoint (and, at its start, quantized/)
        # Method options that cannot fit this model fail now, not after the calibration set is recorded.
        self.datamodule.check_recipe(self.model.sampler)
        self.model.configure_model()
        for cb in self.trainer.callbacks:
            if isinstance(cb, MethodCallback):
                self.model.check_method(cb.method)
        steps = self.model.num_fit_steps()  # of the quantized model
        with self.model.fp_view() as loaded:  # recorded with the run's own model, as loaded
            self.datamodule.prepare_fit(loaded, self.model.sampler, steps, device=self.trainer.strategy.root_device)

    def after_fit(self) -> None:
        if not self.model.progress()["finished"]:  # limits end the fit in FitCheckpoint; this is the safety net
            raise StoppedEarly(self.model.progress()["where"])

    def before_test(self) -> None:
        config = self.config_init[self.subcommand]
        if (config.get("ckpt_path") is None and self.model.quant is not None and self.model.load_quantized is None
                and self.model.load_integer is None):
            last = Path(self.trainer.default_root_dir) / "checkpoints" / "last.ckpt"
            if not last.is_file():
                raise UserError(f"ditquant test: no checkpoint at {last}; run `ditquant fit` with the same --config "
                                "first or pass --ckpt_path")
            config["ckpt_path"] = str(last)
        elif config.get("ckpt_path") == "last":
            config["ckpt_path"] = str(Path(self.trainer.default_root_dir) / "checkpoints" / "last.ckpt")

    def after_test(self) -> None:
        # The full resolved configuration beside the metrics it produced.
        out = Path(self.trainer.default_root_dir) / "test" / "config.yaml"
        if self.trainer.is_global_zero and out.parent.is_dir():
            with atomic_write(out) as tmp:
                tmp.write_text(self._parser(self.subcommand).dump(self.config[self.subcommand], skip_unset=False))


def _validate_dataclasses(fn, namespace: Namespace, path: str) -> None:
    """Build every dataclass-typed argument of ``fn`` from ``namespace`` innermost first, so that a validation
    error names the full option path (``model.quant.weight.bits: …``) instead of jsonargparse's union dump."""
    hints = typing.get_type_hints(fn)
    for name, value in vars(namespace).items():
        if name in hints:
            build(hints[name], value, f"{path}.{name}")


def _validate_callbacks(callbacks) -> None:
    """Build each configured callback once so that its option errors name it, instead of jsonargparse's dump of
    every subclass it tried (the instances are discarded; LightningCLI builds the real ones); then check the
    order of the methods they run."""
    methods: dict[int, MethodCallback] = {}
    for i, cb in enumerate(callbacks if isinstance(callbacks, list) else [callbacks] if callbacks else []):
        if not isinstance(cb, Namespace) or not isinstance(cb.get("class_path"), str):
            continue
        module, _, name = cb.class_path.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            raise UserError(f"trainer.callbacks[{i}]: no class {cb.class_path}{_moved_method(cb.class_path)}"
                            ) from None
        init_args = cb.get("init_args")
        kwargs = dict(vars(init_args)) if isinstance(init_args, Namespace) else {}
        hints = typing.get_type_hints(cls.__init__)
        try:
            built = cls(**{k: build(hints[k], v, k) if k in hints else v for k, v in kwargs.items()})
        except UserError as e:
            where = f"trainer.callbacks[{i}]" + (f".{e}" if str(e).startswith("init_args.") else f" ({name}): {e}")
            raise UserError(where) from None
        if isinstance(built, MethodCallback):
            methods[i] = built
    order = list(methods)
    check_order([methods[i].method for i in order], where=lambda k: f"trainer.callbacks[{order[k]}]")


def _moved_method(class_path: str) -> str:
    """A hint for configs written for ditquant 0.1, whose methods were one callback class each."""
    old = class_path.removeprefix("ditquant.methods.callbacks.")
    new = next((name for name, cls in METHODS.items() if cls.__name__ == old), None)
    if old == class_path or new is None:
        return ""
    return (f" ({class_path} is gone: methods now run through one callback, {{class_path: ditquant.MethodCallback, "
            f"init_args: {{method: {new}, options: {{...}}}}}}, the options as before)")


def _resume_command() -> str:
    args = list(_argv)
    if "--overwrite" in args:  # resuming must not start over
        i = args.index("--overwrite")
        del args[i:i + 2]
    if "--ckpt_path" not in args and not any(a.startswith("--ckpt_path=") for a in args):
        args += ["--ckpt_path", "last"]
    return "ditquant " + shlex.join(args)


_argv: list[str] = []  # the running command's arguments, for the resume hint


def main(args=None) -> None:
    global _argv
    argv = sys.argv[1:] if args is None else list(args)
    verbose = "--verbose" in argv  # ditquant's own flag, anywhere: third-party tips and warnings are shown
    argv = _argv = [a for a in argv if a != "--verbose"]
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not verbose:
        console.quiet()
    if argv[:1] == ["export"]:  # not a Trainer method: its own small parser
        from ditquant.export import command

        _run(lambda: command.main(argv[1:]), "export")
        return
    _run(lambda: DitQuantCLI(
        DiTQuantization, CalibrationData, seed_everything_default=0, args=argv, parser_class=OneLineErrorParser,
        trainer_defaults={"max_epochs": 1, "default_root_dir": "runs/default", "num_sanity_val_steps": 0,
                          "enable_model_summary": False, "logger": False},
        save_config_kwargs={"overwrite": True}), argv[0] if argv else "")


def _run(command, name: str) -> None:
    """Run a command with safe-point signal handling; bad input and interruptions end in one line."""
    try:
        with interrupt.stop_on_signals():
            command()
            interrupt.check()  # a signal that arrived after the last safe point still means "stopped"
    except USER_ERRORS as e:
        if os.environ.get("DITQUANT_DEBUG"):
            raise
        # Bad input (a file, an option, a config that disagrees with the weights): the message says what and where.
        sys.exit(f"ditquant: error: {e}")
    except StoppedEarly as e:
        sys.stderr.write(f"ditquant fit: stopped at {e.where} (trainer.max_steps / max_time): no calibrated model "
                         f"was written; the checkpoint holds the progress. Resume: {_resume_command()}\n")
        sys.exit(EXIT_INCOMPLETE)
    except (Interrupted, SIGTERMException) as e:
        code = e.exit_code if isinstance(e, Interrupted) else 143
        sys.stderr.write(f"ditquant {name}: stopped by {'SIGINT' if code == 130 else 'SIGTERM'}. "
                         f"{_interrupted_hint(name)}\n")
        sys.exit(code)


def _interrupted_hint(name: str) -> str:
    if name == "fit":
        return ("Progress up to the last safe point is in checkpoints/last.ckpt, if one was written; nothing was "
                f"marked finished. Resume: {_resume_command()}")
    if name == "test":
        return "No metrics were written (an older metrics.json was removed at the start). Run the command again."
    return "The output folder was not committed (it has no manifest.json, so nothing loads it). Run the command again."


if __name__ == "__main__":
    main()
