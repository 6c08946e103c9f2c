"""Make verl 0.7.1 run on a machine without an accelerator, and do nothing where CUDA exists.

verl assumes an accelerator in a handful of places (process-group backends, pinned memory, the
``torch.<device>`` memory/RNG API). Each adaptation below names the verl failure it removes. They are
applied in every Ray worker process through ``runtime_env.worker_process_setup_hook`` (see
``ray_runtime_env``), before verl's modules run, so a user needs configuration only.
"""

from __future__ import annotations

import functools
import sys

_applied = False


def cuda_present() -> bool:
    import torch

    return torch.cuda.is_available()


def adapt_verl_to_cpu() -> bool:
    """Apply the CPU adaptations once; return True if they are in force, False on a CUDA machine."""
    global _applied
    if cuda_present():
        return False
    if _applied:
        return True
    _use_gloo_for_collectives()
    _make_pin_memory_a_noop()
    _add_cpu_device_api_standins()
    _applied = True
    return True


def _use_gloo_for_collectives() -> None:
    """verl asks for ``cpu:gloo,cpu:nccl`` ("Duplicate device type cpu"); on CPU only gloo exists."""
    import torch.distributed as dist
    import verl.utils.device as verl_device

    original_get_backend = verl_device.get_nccl_backend

    def get_nccl_backend() -> str:
        return "gloo"

    verl_device.get_nccl_backend = get_nccl_backend
    # Modules imported before this hook bound the original function by name: rebind them too.
    for name, module in list(sys.modules.items()):
        if name.startswith("verl.") and getattr(module, "get_nccl_backend", None) is original_get_backend:
            module.get_nccl_backend = get_nccl_backend

    original_init = dist.init_process_group

    @functools.wraps(original_init)
    def init_process_group(*args, backend=None, **kwargs):
        if isinstance(backend, str) and ("," in backend or backend == "nccl"):
            backend = "gloo"
        return original_init(*args, backend=backend, **kwargs)

    dist.init_process_group = init_process_group


def _make_pin_memory_a_noop() -> None:
    """FSDP2 offload policies pin host memory, which needs an accelerator ("Cannot access accelerator")."""
    import torch

    torch.Tensor.pin_memory = lambda self, *args, **kwargs: self
    torch.Tensor.is_pinned = lambda self, *args, **kwargs: False


def _add_cpu_device_api_standins() -> None:
    """verl calls ``get_torch_device().<fn>`` (here ``torch.cpu``) for memory stats, caches and RNG state."""
    import torch

    cpu = torch.cpu
    zero = lambda *args, **kwargs: 0  # noqa: E731
    nothing = lambda *args, **kwargs: None  # noqa: E731
    standins = {
        "memory_allocated": zero,
        "memory_reserved": zero,
        "max_memory_allocated": zero,
        "max_memory_reserved": zero,
        "reset_peak_memory_stats": nothing,
        "empty_cache": nothing,
        "mem_get_info": lambda *args, **kwargs: _host_memory_free_total(),
        "manual_seed": lambda seed: torch.manual_seed(seed),
        "manual_seed_all": lambda seed: torch.manual_seed(seed),
        "get_rng_state": lambda *args, **kwargs: torch.get_rng_state(),
        "set_rng_state": lambda state, *args, **kwargs: torch.set_rng_state(state),
        "memory_stats": lambda *args, **kwargs: {},
        "ipc_collect": nothing,
    }
    for name, fn in standins.items():
        if not hasattr(cpu, name):
            setattr(cpu, name, fn)


def _host_memory_free_total() -> tuple[int, int]:
    import psutil

    vm = psutil.virtual_memory()
    return vm.available, vm.total
