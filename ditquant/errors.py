"""The two ways a ditquant command ends early on purpose.

``UserError``: bad input (an option, a file, a checkpoint that does not fit the config). The CLI prints its message
as one line, ``ditquant: error: …``; every other exception is a bug and keeps its traceback. It subclasses
ValueError so library callers that catch ValueError keep working.

``StoppedEarly``: a fit reached ``--trainer.max_steps`` / ``max_time`` before its last unit; its checkpoint is
saved and no calibrated model is written.

``Interrupted``: SIGINT / SIGTERM arrived and the command stopped at a safe point (see ``ditquant.interrupt``). A
BaseException, like KeyboardInterrupt, so that ``except Exception`` never swallows it.
"""

from __future__ import annotations

import signal


class UserError(ValueError):
    """Bad input; the message names the option or file and what is wrong with it."""


class Interrupted(BaseException):
    """A stop requested by a signal, raised at the next safe point."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM


class StoppedEarly(BaseException):
    """A fit stopped by its step or time limit before calibration finished (``where``: how far it got)."""

    def __init__(self, where: str):
        super().__init__(where)
        self.where = where
