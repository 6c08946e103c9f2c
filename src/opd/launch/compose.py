"""python -m opd.launch.compose ENTRY OUT.yaml [verl overrides...]

Compose an entry point's verl config exactly as ``python -m ENTRY overrides...`` would, resolve it
(no interpolations left), run that entry's input checks (model, teacher, tokenizer, data files) and
write it to OUT.yaml. The login side calls this in a subprocess for each run before anything is
submitted: verl's config tree imports torch, which the login process itself never needs, and a bad
input is refused here instead of in a queued job. Exit 2 with ``error: ...`` on bad input.
"""

from __future__ import annotations

import sys
from pathlib import Path

ENTRIES = ("opd.main_grpo", "opd.main_opd", "opd.main_eval")


def entry_module(entry: str):
    """The entry point's module: its ``CONFIG_NAME`` and ``check_config`` are what it runs itself."""
    import importlib

    if entry not in ENTRIES:
        raise ValueError(f"unknown entry {entry!r}: choose one of {list(ENTRIES)}")
    return importlib.import_module(entry)


def compose_resolved(entry: str, overrides: list[str]):
    """The entry's config for ``overrides``, resolved and checked as the entry would check it."""
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    import opd.config  # noqa: F401  (the opd.* resolvers)

    module = entry_module(entry)
    with initialize_config_module(config_module="opd.config", version_base=None):
        config = compose(config_name=module.CONFIG_NAME, overrides=overrides)
    OmegaConf.resolve(config)
    module.check_config(config)
    return config


def main(argv: list[str] | None = None) -> None:
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from opd.data.checks import InputError

    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 2:
        print(__doc__.splitlines()[0], file=sys.stderr)
        sys.exit(2)
    entry, out, overrides = argv[0], Path(argv[1]), argv[2:]
    try:
        config = compose_resolved(entry, overrides)
    except (InputError, ValueError, HydraException, OmegaConfBaseException) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    out.parent.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(config, out)


if __name__ == "__main__":
    main()
