"""verl on CPU: a platform adaptation and the ``hf`` rollout backend (the project's "embedded default").

Select it in any verl config with ``actor_rollout_ref.rollout.name=hf`` and ``trainer.device=cpu``;
``ray_init_overrides`` gives the Ray resources such a run needs; ``opd.runtime.setup_ray_worker`` (every
run's Ray ``worker_process_setup_hook``) applies the adaptation in every worker process. On a CUDA machine
``setup_worker`` only registers the ``hf`` name and changes nothing else.
"""

from __future__ import annotations


def setup_worker() -> None:
    """Ray ``worker_process_setup_hook``: runs in every worker process before any task."""
    from opd.backends.cpu import hf_rollout, platform

    platform.adapt_verl_to_cpu()
    hf_rollout.register()


def ray_init_overrides(n_workers: int) -> dict:
    """Ray init settings for a CPU run with ``n_workers`` training processes.

    verl counts accelerators before placing workers ("Total available GPUs 0 is less than total
    desired GPUs"), so Ray gets that many logical GPUs; with ``trainer.device=cpu`` each placement
    bundle also asks for a resource literally named ``cpu``, declared here as a custom resource. verl's
    bundles also ask for 3 logical CPUs per worker: logical, not physical cores.
    """
    return {
        "num_cpus": max(8, 3 * n_workers + 4),
        "num_gpus": n_workers,
        "resources": {"cpu": n_workers},
    }
