"""Moved: the training rewrites for XLA's CPU backend are in opt_flax.fast_paths (kept importable here)."""
from opt_flax.fast_paths import *  # noqa: F401,F403
