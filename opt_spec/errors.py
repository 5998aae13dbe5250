"""The error classes optkit's readers raise for bad input, so a caller (and the CLI) can tell a file that
was refused from a bug.

`CheckpointError` is a ValueError: a checkpoint file or folder that optkit will not read, because it is
malformed, inconsistent or hostile (a path outside the folder, a length larger than the file, a nesting
too deep, a pickle that names code). Its message names the file and the entry at fault.

This is the documented contract of every reader (opt_spec.io, opt_spec.torch_pickle, conversion, each
backend's from_pretrained): given any bytes, it returns the tensors the file holds or raises a
CheckpointError (or a subclass: ConfigError, conversion's ConversionError, the pickle and msgpack
readers' own classes, WeightMismatchError). A KeyError, TypeError, RecursionError, MemoryError or
OverflowError escaping a reader is a bug. The fuzz test (tests/test_fuzz_readers.py) holds the readers to
this. Missing files stay FileNotFoundError (nothing was refused: there was nothing to read).
"""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint (or its config or index) that is refused; the message names the file and the problem."""


class ConfigError(CheckpointError):
    """A config field out of its documented range (OPTConfig's bounds); the message names field and value,
    and the file when the config came from one."""
