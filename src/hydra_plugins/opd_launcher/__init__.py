"""opd's Hydra launcher plugin (Hydra loads launcher classes only from the ``hydra_plugins`` package)."""
