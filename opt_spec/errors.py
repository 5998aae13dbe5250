"""The error classes optkit's readers raise for bad input, so a caller (and the CLI) can tell a file that
was refused from a bug.

`CheckpointError` is a ValueError: a checkpoint file or folder that optkit will not read, because it is
malformed, inconsistent or hostile (a path outside the folder, a length larger than the file, a nesting
too deep, a pickle that names code). Its message names the file and the entry at fault.
"""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint (or its config or index) that is refused; the message names the file and the problem."""
