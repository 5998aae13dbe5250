"""optkit conversion (work in progress)."""
