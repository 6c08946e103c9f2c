"""python -m opd.launch.multirun -m [overrides]   (started in the background by ``opd.launch.sweep``)

The Hydra multirun behind ``make sweep-*``: the launcher (``hydra_plugins.opd_launcher``) writes every run
directory and submits one job per sweep point; in each job, on each node, the task below runs this
node's part of the run (``opd.launch.node``).
"""

from __future__ import annotations

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from opd.launch import CONFIGS


@hydra.main(config_path=CONFIGS, config_name="launch", version_base=None)
def main(cfg: DictConfig) -> None:
    from opd.launch import node

    code = node.run(HydraConfig.get().runtime.output_dir)
    if code != 0:
        raise SystemExit(code)


if __name__ == "__main__":
    main()
