"""Methods: registered, Lightning-free transforms of a quantized model (see ``ditquant.methods.base``).

Importing this package registers the built-in methods: ``salience_balancing`` (PTQ4DiT), ``temporal_smoothing`` and
``low_rank_compensation`` (DiTAS), ``granularity_search`` and ``gptq`` (Q-DiT), ``input_rotation`` (Hadamard
rotation of linear inputs), ``svdquant_branch`` (SVDQuant's FP low-rank branch), ``mixed_precision`` (activation bit widths per layer under a budget).
"""

from ditquant.methods.balancing import SalienceBalancing
from ditquant.methods.base import METHODS, Method, MethodContext, check_order, method_class, register, run_methods
from ditquant.methods.gptq import GPTQ
from ditquant.methods.granularity import GranularitySearch
from ditquant.methods.low_rank import LowRankCompensation, SVDQuantBranch
from ditquant.methods.mixed_precision import MixedPrecision
from ditquant.methods.rotation import InputRotation
from ditquant.methods.smoothing import TemporalSmoothing

__all__ = ["METHODS", "GPTQ", "GranularitySearch", "InputRotation", "LowRankCompensation", "Method", "MethodContext",
           "MixedPrecision",
           "SVDQuantBranch", "SalienceBalancing", "TemporalSmoothing", "check_order", "method_class", "register",
           "run_methods"]
