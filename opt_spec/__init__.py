"""optkit's framework-neutral specification of OPT: config, presets, weight table, numeric rules.

Imports NumPy at most; every backend and the converters are built from what is defined here.
"""

from .config import ACTIVATIONS, OPTConfig
from .numerics import IGNORE_INDEX, LAYER_NORM_EPS, POSITION_OFFSET
from .presets import PRESETS
from .weights import (HEADS, Head, LoadPlan, WeightKind, WeightMismatchError, WeightSpec, check_weights,
                      count_parameters, normalize_names, optional_weights, plan_load, planned_tensors, tied_source,
                      weight_table)

__all__ = [
    "ACTIVATIONS", "HEADS", "IGNORE_INDEX", "LAYER_NORM_EPS", "OPTConfig", "POSITION_OFFSET", "PRESETS",
    "Head", "WeightKind", "WeightMismatchError", "WeightSpec", "check_weights", "count_parameters",
    "normalize_names", "plan_load", "planned_tensors", "LoadPlan", "optional_weights", "tied_source", "weight_table",
]
__version__ = "0.1.0"
