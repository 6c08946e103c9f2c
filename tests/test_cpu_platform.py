"""The CPU adaptation: in force without CUDA, a strict no-op with CUDA (checked in fresh processes,
since it patches process-wide state)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

# each test imports torch and verl in a fresh process (~10 CPU-s): e2e, not the fast tier
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

SNAPSHOT = textwrap.dedent(
    """
    import json, torch, torch.distributed as dist
    import verl.utils.device as d
    import verl.workers.fsdp_workers as w
    def snapshot():
        return {
            "get_nccl_backend": id(d.get_nccl_backend),
            "workers_get_nccl_backend": id(w.get_nccl_backend),
            "init_process_group": id(dist.init_process_group),
            "pin_memory": id(torch.Tensor.pin_memory),
            "is_pinned": id(torch.Tensor.is_pinned),
            "cpu_api": sorted(n for n in dir(torch.cpu) if not n.startswith("_")),
        }
    """
)


def _run(code: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", SNAPSHOT + textwrap.dedent(code)], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_adaptation_is_a_noop_when_cuda_is_available():
    result = _run(
        """
        torch.cuda.is_available = lambda: True   # forced: this machine has no GPU
        before = snapshot()
        from opd.backends.cpu import setup_worker, platform
        setup_worker()
        applied = platform.adapt_verl_to_cpu()
        print(json.dumps({"same": snapshot() == before, "applied": applied}))
        """
    )
    assert result == {"same": True, "applied": False}


def test_adaptation_applies_without_cuda_and_collectives_use_gloo():
    result = _run(
        """
        before = snapshot()
        from opd.backends.cpu import setup_worker
        setup_worker()
        after = snapshot()
        import os, tempfile
        # the backend string verl's FSDP worker passes, on a 1-process group
        dist.init_process_group(backend="cpu:gloo,cpu:nccl", rank=0, world_size=1,
                                init_method="file://" + tempfile.mkdtemp() + "/pg")
        t = torch.ones(3); dist.all_reduce(t)
        print(json.dumps({
            "backend": d.get_nccl_backend(), "workers_backend": w.get_nccl_backend(),
            "pg_backend": dist.get_backend(), "sum": t.tolist(),
            "pin_returns_same": (lambda x: x.pin_memory() is x)(torch.ones(2)),
            "memory_reserved": torch.cpu.memory_reserved(),
            "changed": [k for k in before if before[k] != after[k]],
        }))
        """
    )
    assert result["backend"] == "gloo" and result["workers_backend"] == "gloo"
    assert result["pg_backend"] == "gloo" and result["sum"] == [1.0, 1.0, 1.0]
    assert result["memory_reserved"] == 0 and result["pin_returns_same"]
    assert set(result["changed"]) >= {
        "get_nccl_backend",
        "workers_get_nccl_backend",
        "init_process_group",
        "pin_memory",
    }


def test_hf_rollout_is_registered_by_the_setup_hook():
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                """
            from opd.backends.cpu import setup_worker
            setup_worker()
            from verl.workers.rollout import get_rollout_class
            from verl.workers.rollout.replica import get_rollout_replica_class
            print(get_rollout_class("hf", "async").__name__, get_rollout_replica_class("hf").__name__)
            """
            ),
        ],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["HFServerAdapter", "HFReplica"]
