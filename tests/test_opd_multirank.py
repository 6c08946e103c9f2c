"""Two ranks (gloo process group, FSDP2-sharded student and teacher, as verl shards them) running the
Ray-free step on different rows: ranks that drop different numbers of rows (an overlong row, a tool-only
row), a rank left with no row at all, and PACED weights computed over the whole batch on the driver (a
prompt's samples on both ranks, rows of weight 0 dropped). Both finish (a hang fails the test at its deadline), and the
gradient of every optimizer step equals the one-rank step's on the same kept rows: the passes line up, the
normaliser is global, and FSDP's averaging is undone by the loss scale."""

from __future__ import annotations

import multiprocessing
import os
import socket
from datetime import timedelta
from pathlib import Path

import pytest
import torch

from opd.distill.batch import build_opd_batch
from opd.distill.config import OPDConfig
from opd.distill.step import StepSettings, run_step
from test_opd_batch import rollout_batch

VOCAB = 438
DEADLINE_S = 90  # both ranks, start-up included (about 10 s when nothing hangs)
SETTINGS = StepSettings(rows_per_mini_batch=2, max_tokens=16, grad_clip=1e9)  # 2 optimizer steps per rank


def rank_rows(rank: int, case: str) -> list:
    """Four rollout rows per rank. Rank 0 keeps rows 0 and 3 (row 1 is overlong, row 2 tool-only); rank 1
    keeps all four ('uneven'), or none ('empty_rank')."""
    gen = torch.Generator().manual_seed(rank)

    def row(prompt, response, tool=False):
        ids = torch.randint(7, VOCAB, (prompt + response,), generator=gen).tolist()
        return ids[:prompt], ids[prompt:], [0 if tool else 1] * response

    if rank == 0:
        return [row(3, 5), row(4, 40), row(2, 6, tool=True), row(5, 9)]
    if case in ("uneven", "paced"):
        return [row(2, 3), row(6, 8), row(3, 12), row(4, 4)]
    return [row(3, 40), row(2, 5, tool=True), row(6, 30), row(2, 4, tool=True)]


def opd_batch(batch_rows, sample_weights):
    return build_opd_batch(
        rollout_batch(batch_rows, weights=sample_weights),
        pad_token_id=0,
        max_length=24,
        overlong="skip",
        allow_empty=True,
    )


# 'paced': the driver's batch is rank 0's rows then rank 1's; prompts a, b have samples on both ranks, c's
# are always solved (weight 0: global rows 2 and 5 are dropped before the teacher)
PACED_UIDS = ["a", "b", "c", "a", "b", "c", "a", "b"]
PACED_SCORES = [1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0, 1.0]  # p(a) = 1/3, p(b) = 2/3


def weights_of(rank: int, case: str = "uneven") -> list[float]:
    if case == "paced":
        from opd.distill.weights import pass_rate_weights

        weights_B = pass_rate_weights(torch.tensor(PACED_SCORES), PACED_UIDS, alpha=2.0, beta=1.0)
        return weights_B[4 * rank : 4 * rank + 4].tolist()
    return [1.0 + rank + 0.5 * i for i in range(4)]


def step_grads(student, teacher, opd, config, settings, batch_rows: int, full) -> tuple[list, dict]:
    """Each optimizer step's full gradient (gathered from the shards) and the step's metrics."""
    optimizer = torch.optim.SGD(student.parameters(), lr=0.0)
    grads = []

    def clip_and_step():
        grads.append(torch.cat([full(p.grad).flatten() for p in student.parameters()]))
        optimizer.step()
        return 0.0

    metrics = run_step(
        student, teacher, optimizer, opd, config, settings, batch_rows=batch_rows, clip_and_step=clip_and_step
    )
    return grads, metrics


def rank_main(rank: int, port: int, case: str, mode: str, tiny: str, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # a collective that waits longer than this raises instead of hanging forever
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=60))
    mesh = init_device_mesh("cpu", (2,))
    models = []
    for name in ("student", "teacher"):
        model = AutoModelForCausalLM.from_pretrained(Path(tiny) / name, dtype=torch.float32)
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        models.append(model)
    config = OPDConfig(teacher_signal="hidden", vocab_size=VOCAB, loss_agg_mode=mode)
    opd = opd_batch(rank_rows(rank, case), weights_of(rank, case))
    grads, metrics = step_grads(*models, opd, config, SETTINGS, 4, lambda g: g.full_tensor())
    torch.save({"grads": grads, "metrics": metrics, "kept": opd.kept_rows}, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_rank_reference(tiny_assets, case: str, mode: str) -> tuple[list, dict]:
    """The same kept rows on one rank, ordered so that mini-batch m holds both ranks' rows of their
    mini-batch m (4 rows per mini-batch instead of 2)."""
    from transformers import AutoModelForCausalLM

    per_rank = [rank_rows(r, case) for r in (0, 1)]
    batch_rows = per_rank[0][0:2] + per_rank[1][0:2] + per_rank[0][2:4] + per_rank[1][2:4]
    w = (
        weights_of(0, case)[0:2]
        + weights_of(1, case)[0:2]
        + weights_of(0, case)[2:4]
        + weights_of(1, case)[2:4]
    )
    opd = opd_batch(batch_rows, w)
    models = [
        AutoModelForCausalLM.from_pretrained(tiny_assets / n, dtype=torch.float32)
        for n in ("student", "teacher")
    ]
    settings = StepSettings(rows_per_mini_batch=4, max_tokens=16, grad_clip=1e9)
    config = OPDConfig(teacher_signal="hidden", vocab_size=VOCAB, loss_agg_mode=mode)
    return step_grads(*models, opd, config, settings, 8, lambda g: g)


@pytest.mark.timeout(DEADLINE_S + 30)
@pytest.mark.parametrize(
    ("case", "mode"),
    [("uneven", "token-mean"), ("empty_rank", "seq-mean-token-mean"), ("paced", "token-mean")],
)
def test_two_ranks_finish_and_match_the_one_rank_step(tiny_assets, tmp_path, case, mode):
    context = multiprocessing.get_context("spawn")
    port = free_port()
    ranks = [
        context.Process(
            target=rank_main, args=(r, port, case, mode, str(tiny_assets), str(tmp_path)), daemon=True
        )
        for r in (0, 1)
    ]
    for process in ranks:
        process.start()
    for process in ranks:
        process.join(DEADLINE_S)
    hung = [r for r, process in enumerate(ranks) if process.is_alive()]
    for process in ranks:
        if process.is_alive():
            process.kill()
    assert not hung, f"ranks {hung} still running after {DEADLINE_S} s: the passes did not line up"
    assert [process.exitcode for process in ranks] == [0, 0]

    results = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert results[0]["kept"] == [0, 3]
    assert results[1]["kept"] == {"uneven": [0, 1, 2, 3], "empty_rank": [], "paced": [0, 2, 3]}[case]
    if case == "paced":  # weights differ between the prompts, and the dropped row saved the teacher's tokens
        assert len(set(weights_of(0, case)) - {0.0}) == 2
        assert results[1]["metrics"]["opd/rows_skipped_zero_weight"] == 2  # summed over ranks: rows 2 and 5
    counts = [r["metrics"]["opd/micro_batches"] for r in results]
    assert counts[0] == counts[1]  # the same number of passes
    assert (
        results[0]["metrics"]["opd/padding_micro_batches"]
        + results[1]["metrics"]["opd/padding_micro_batches"]
        > 0
    )
    if case == "empty_rank":
        assert results[1]["metrics"]["opd/padding_micro_batches"] == counts[1]  # only stand-ins

    reference, _ = one_rank_reference(tiny_assets, case, mode)
    assert len(results[0]["grads"]) == len(results[1]["grads"]) == len(reference) == 2
    for step, expected in enumerate(reference):
        for rank in (0, 1):  # FSDP gives every rank the averaged gradient
            got = results[rank]["grads"][step]
            assert float((got - expected).norm() / expected.norm()) <= 1e-4, (step, rank)
