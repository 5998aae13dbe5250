"""optkit checkpoint conversion: every OPT checkpoint format, streamed tensor by tensor, verified.

    from conversion import convert, detect_format
    convert("facebook-opt-125m/", "opt-125m-tf/", to="hf-tf", dtype="float16")

Formats (FORMATS): hf-safetensors, hf-pytorch, hf-tf, hf-flax, metaseq (read only), torch-state-dict,
keras-weights, flax-params. Everything goes through canonical names and NumPy arrays; no format needs
its framework installed (h5py is needed for .h5 files). Importing this package imports no framework.
"""

from .api import ALIASES, DEFAULT_TARGET, FORMATS, Format, Summary, convert, detect_format, read_checkpoint
from .base import Checkpoint, ConversionError, TensorRef

__all__ = ["ALIASES", "Checkpoint", "ConversionError", "DEFAULT_TARGET", "FORMATS", "Format", "Summary",
           "TensorRef", "convert", "detect_format", "read_checkpoint"]
