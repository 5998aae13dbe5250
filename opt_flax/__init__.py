"""optkit opt_flax (work in progress)."""
