"""``ditquant fit | test`` (and ``ditquant export``, see ``ditquant.integer.command``): LightningCLI over DiTQuantization + CalibrationData, configured by YAML.

Configs compose by repeating ``--config`` (e.g. a model config, then a method config). ``test`` without
``--ckpt_path`` uses ``<trainer.default_root_dir>/checkpoints/last.ckpt`` written by ``fit``.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from ditquant.calibration.datamodule import CalibrationData
from ditquant.checkpointing import AtomicCheckpointIO, FitCheckpoint
from ditquant.io import atomic_write
from ditquant.methods.callbacks import Preprocessing
from ditquant.task import DiTQuantization


USER_ERRORS = (ValueError, FileNotFoundError, ConnectionError)


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

    def instantiate_trainer(self, **kwargs):
        trainer = super().instantiate_trainer(**kwargs)
        trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        return trainer

    def before_fit(self) -> None:
        # Pre-processing options that cannot fit this model fail now, not after the calibration set is recorded.
        self.model.configure_model()
        for cb in self.trainer.callbacks:
            if isinstance(cb, Preprocessing):
                cb.check(self.model)

    def after_test(self) -> None:
        # The full resolved configuration beside the metrics it produced.
        out = Path(self.trainer.default_root_dir) / "test" / "config.yaml"
        if self.trainer.is_global_zero and out.parent.is_dir():
            with atomic_write(out) as tmp:
                tmp.write_text(self._parser(self.subcommand).dump(self.config[self.subcommand], skip_unset=False))

    def before_test(self) -> None:
        config = self.config_init[self.subcommand]
        if (config.get("ckpt_path") is None and self.model.quant is not None and self.model.load_quantized is None
                and self.model.load_integer is None):
            last = Path(self.trainer.default_root_dir) / "checkpoints" / "last.ckpt"
            if not last.is_file():
                sys.exit(f"ditquant test: no checkpoint at {last}; run `ditquant fit` with the same --config first "
                         f"or pass --ckpt_path")
            config["ckpt_path"] = str(last)


def main(args=None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    argv = sys.argv[1:] if args is None else list(args)
    if argv[:1] == ["export"]:  # not a Trainer method: its own small parser
        from ditquant.integer import command

        _report_user_errors(lambda: command.main(argv[1:]))
        return
    # The DiT stays in eval mode during fit on purpose (label dropout off): Lightning's warning about it is noise.
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
    _report_user_errors(lambda: DitQuantCLI(
        DiTQuantization, CalibrationData, seed_everything_default=0, args=args,
        trainer_defaults={"max_epochs": 1, "default_root_dir": "runs/default", "num_sanity_val_steps": 0},
        save_config_kwargs={"overwrite": True}))


def _report_user_errors(run) -> None:
    try:
        run()
    except USER_ERRORS as e:
        if os.environ.get("DITQUANT_DEBUG"):
            raise
        # Bad input (a file, an option, a config that disagrees with the weights): the message says what and where.
        sys.exit(f"ditquant: error: {e}\n(set DITQUANT_DEBUG=1 for the traceback)")


if __name__ == "__main__":
    main()
