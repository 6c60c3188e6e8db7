"""One widget per view; each renders a ``ViewState`` and reads nothing else."""
