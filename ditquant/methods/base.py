"""Methods as registered, Lightning-free transforms of a quantized model.

A method is a dataclass whose fields are its options (what a YAML config sets) with an
``apply(model, calibration, ctx) -> report``. It registers itself under a name with ``@register``; ``ditquant fit``
runs any registered method named in a ``ditquant.MethodCallback`` (or given by import path), and Python code calls
``method.apply`` or ``run_methods`` directly.

What a method changes is declared (``changes``), so that a list of methods is checked before any work:

- ``fp_weights``: rewrites the FP weights with the function unchanged (an exact fold: balancing, smoothing);
- ``group_sizes`` / ``bit_widths``: chooses the quantizers' layout (Q-DiT's group-size search, the mixed-precision
  search);
- ``quantized_weights``: fixes the quantized weights (GPTQ, low-rank compensation). Nothing may change the FP
  weights or the layout after it, and two methods may not both fix them.

``fp_statistics``: the method's statistics are of the FP model, so ``run_methods`` bypasses every quantizer while
it runs (balancing and smoothing measure FP activations; GPTQ and the search need the quantizers on).
"""

from __future__ import annotations

import importlib
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, Optional, Sequence

from torch import nn

from ditquant.calibration.dataset import calibration_batches
from ditquant.errors import UserError
from ditquant.quant.modules import quant_disabled

CHANGES = ("fp_weights", "group_sizes", "bit_widths", "quantized_weights")
Batches = Callable[[], Iterable[dict]]


@dataclass
class MethodContext:
    """What a method may use besides the model and the calibration set; every field has a usable default.

    Args:
        batches: the calibration set in a fixed order, ``batch_size`` entries per batch (a fresh iterable per call).
        batch_size: the run's calibration batch size (``data.batch_size``).
        quant: the model's QuantConfig (None: unknown, e.g. a model quantized by hand).
        reconstruction: the run's ReconstructionConfig, if it reconstructs after the methods.
        set_quant: adopt a changed QuantConfig (a searched layout: ``layer_group_sizes``,
            ``layer_activation_bits``), so the run saves and records it.
        scorer: builds a model-quality score from a method's options (``sample_set_fid(**options) -> score(model)``,
            lower is better), for methods that search; provided by the caller, who knows the model's family.
        output_dir: where a method writes files of its own (the run's folder).
        resume: the state a method saved with ``save_progress`` in an interrupted run.
        save_progress: record a method's resumable state (``ditquant fit`` saves it in ``last.ckpt``).
    """

    batches: Optional[Batches] = None
    batch_size: int = 32
    quant: Any = None
    reconstruction: Any = None
    set_quant: Optional[Callable[[Any], None]] = None
    scorer: Optional[Callable[..., Callable[[nn.Module], float]]] = None
    output_dir: Path = Path(".")
    resume: Optional[dict] = None
    save_progress: Callable[[dict], None] = lambda state: None

    def calibration_batches(self, calibration) -> Iterable[dict]:
        """The calibration set in order, ``batch_size`` entries per batch."""
        if self.batches is not None:
            return self.batches()
        return calibration_batches(calibration, self.batch_size)


class Method:
    """Base of every method (subclasses are dataclasses of their options)."""

    name: ClassVar[str] = ""
    changes: ClassVar[frozenset] = frozenset()
    fp_statistics: ClassVar[bool] = False

    def check(self, model: nn.Module, ctx: MethodContext) -> None:
        """Refuse options that cannot fit ``model`` before any work (``ditquant fit`` calls it before recording the
        calibration set)."""

    def apply(self, model: nn.Module, calibration, ctx: MethodContext) -> dict:
        raise NotImplementedError

    def options(self) -> dict:
        return asdict(self)


METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make ``cls`` runnable by name (``MethodCallback(method=cls.name)``)."""
    if not cls.name:
        raise TypeError(f"{cls.__name__} needs a class attribute `name` to be registered")
    if unknown := set(cls.changes) - set(CHANGES):
        raise TypeError(f"{cls.__name__}.changes: unknown {sorted(unknown)}; known: {CHANGES}")
    if cls.name in METHODS and METHODS[cls.name] is not cls:
        known = METHODS[cls.name]
        raise TypeError(f"method name {cls.name!r} is taken by {known.__module__}.{known.__qualname__}")
    METHODS[cls.name] = cls
    return cls


def method_class(name: str, option: str = "method") -> type[Method]:
    """A registered method by name, or a Method subclass by import path (``package.module.Class``)."""
    if name in METHODS:
        return METHODS[name]
    module, _, attr = name.rpartition(".")
    if module:
        try:
            cls = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError):
            cls = None
        if isinstance(cls, type) and issubclass(cls, Method):
            return cls
    raise UserError(f"{option}: no method {name!r}; registered methods: {', '.join(sorted(METHODS))} (or give a "
                    "Method subclass by import path, package.module.Class)")


def check_order(methods: Sequence[Method], where: Callable[[int], str] = lambda i: f"method {i}") -> None:
    """Refuse a method list whose declared changes conflict (see the module doc), before any work; ``where(i)``
    names the i-th method in the message (``trainer.callbacks[2]``)."""
    fixed: Optional[int] = None  # the method that fixed the quantized weights
    for i, m in enumerate(methods):
        if fixed is not None:
            first = f"{where(fixed)} ({methods[fixed].name})"
            if "quantized_weights" in m.changes:
                raise UserError(f"{where(i)} ({m.name}) and {first} both fix the quantized weights: use one")
            if late := sorted(set(m.changes) & {"fp_weights", "group_sizes", "bit_widths"}):
                raise UserError(f"{where(i)} ({m.name}) changes the {late[0].replace('_', ' ')}, but {first} has "
                                f"already fixed the quantized weights: list {m.name} first")
        if "quantized_weights" in m.changes:
            fixed = i


def run_methods(model: nn.Module, calibration, methods: Sequence[Method],
                ctx: Optional[MethodContext] = None) -> list[dict]:
    """Check the list, then apply each method in order; returns their reports (with the seconds each took)."""
    ctx = ctx or MethodContext()
    check_order(methods)
    for m in methods:
        m.check(model, ctx)
    return [run_method(model, calibration, m, ctx) for m in methods]


def run_method(model: nn.Module, calibration, method: Method, ctx: MethodContext) -> dict:
    """Apply one (already checked) method; FP-statistics methods run with every quantizer bypassed."""
    started = time.perf_counter()
    if method.fp_statistics:
        with quant_disabled(model):
            report = method.apply(model, calibration, ctx)
    else:
        report = method.apply(model, calibration, ctx)
    report = dict(report)
    report["seconds"] = report.get("seconds", 0.0) + time.perf_counter() - started
    return report


