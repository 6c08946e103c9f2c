"""verl-side Hydra configs (a package so that Hydra can find it as a config module)."""
