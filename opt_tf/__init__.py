"""optkit opt_tf (work in progress)."""
