"""``python -m opd.checkpoint convert``: verl FSDP actor checkpoint -> verified Hugging Face model.

The conversion of a real checkpoint (the 2-step ``jobs/train_grpo.sh`` run) is tested in
test_grpo_e2e.py, beside the run that makes it. Multi-rank layouts, which a 1-process CPU run cannot produce, are built from the tiny student as DTensor shards in verl's file layout;
malformed directories are a few small files, since only path validation reads them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from opd.checkpoint import (
    MARKER_FILE,
    VerificationError,
    convert,
    find_actor_checkpoint,
    main,
    reassemble,
    verify_conversion,
)
from opd.data.checks import InputError

HF_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json")


def write_sharded_checkpoint(step_dir: Path, model_dir: Path, mesh_shape: tuple[int, ...]) -> dict:
    """``model_dir``'s weights as verl saves an FSDP2 actor: one DTensor state dict per rank over a device
    mesh of ``mesh_shape`` (``(fsdp,)`` or ``(ddp, fsdp)``), row shards of uneven size, a column-sharded
    and replicated tensor, ``fsdp_config.json`` and ``huggingface/`` without weights. Returns the weights."""
    import torch
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from transformers import AutoModelForCausalLM

    state = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).state_dict()
    world_size = int(torch.tensor(mesh_shape).prod())
    mesh_ranks = torch.arange(world_size).reshape(mesh_shape)
    names = ("fsdp",) if len(mesh_shape) == 1 else ("ddp", "fsdp")
    actor = step_dir / "actor"
    (actor / "huggingface").mkdir(parents=True)
    for rank in range(world_size):
        mesh = DeviceMesh("cpu", mesh_ranks, mesh_dim_names=names, _init_backend=False, _rank=rank)
        fsdp_index = int((mesh_ranks == rank).nonzero()[0, -1])
        shards = {}
        for key, full in state.items():
            placement = Replicate() if "norm" in key else Shard(1 if "down_proj" in key else 0)
            if placement.is_shard():
                chunks = torch.chunk(full, mesh_shape[-1], dim=placement.dim)
                assert len(chunks) == mesh_shape[-1], key
                local = chunks[fsdp_index].clone()
            else:
                local = full.clone()
            placements = (placement,) if len(mesh_shape) == 1 else (Replicate(), placement)
            shards[key] = DTensor.from_local(
                local, mesh, placements, run_check=False, shape=full.shape, stride=full.stride()
            )
        torch.save(shards, actor / f"model_world_size_{world_size}_rank_{rank}.pt")
    (actor / "fsdp_config.json").write_text(json.dumps({"FSDP_version": 2, "world_size": world_size}))
    for name in (*HF_FILES, "special_tokens_map.json", "chat_template.jinja"):
        if (model_dir / name).is_file():
            shutil.copy(model_dir / name, actor / "huggingface" / name)
    (step_dir.parent / "latest_checkpointed_iteration.txt").write_text(step_dir.name.rsplit("_", 1)[1])
    return state


def load_stored(model_dir: Path) -> dict:
    """The converted weights as stored (dtype included), tied ones filled in by transformers."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto").state_dict()


def perturb(model_dir: Path, key: str, delta: float = 0.01) -> None:
    from safetensors.torch import load_file, save_file

    path = model_dir / "model.safetensors"
    tensors = load_file(path)
    tensors[key][3, 5] += delta
    save_file(tensors, path, metadata={"format": "pt"})


# --- multi-rank DTensor layouts and verification, built from the tiny student ------------------------


@pytest.mark.parametrize("mesh_shape", [(4,), (2, 2)], ids=["fsdp4", "ddp2xfsdp2"])
def test_sharded_checkpoint_reassembles_and_converts_to_the_model(tiny_assets, tmp_path, mesh_shape):
    import torch

    checkpoints = tmp_path / "checkpoints"
    state = write_sharded_checkpoint(checkpoints / "global_step_3", tiny_assets / "student", mesh_shape)
    actor = checkpoints / "global_step_3" / "actor"
    reassembled = reassemble(find_actor_checkpoint(actor))
    assert reassembled.keys() == state.keys()
    assert all(torch.equal(reassembled[k], state[k]) for k in state)

    report = convert(checkpoints)
    assert report.actor_dir == actor and report.target == actor / "huggingface"
    assert report.world_size == 4 and report.n_tensors == len(state)
    assert report.max_abs_logit_diff <= report.verification.logit_tolerance
    converted = load_stored(report.target)
    assert all(torch.equal(state[k].to(t.dtype), t) for k, t in converted.items())


@pytest.fixture
def converted_fake(tiny_assets, tmp_path):
    write_sharded_checkpoint(tmp_path / "ckpt" / "global_step_2", tiny_assets / "student", (2,))
    actor = tmp_path / "ckpt" / "global_step_2" / "actor"
    return actor, convert(actor, tmp_path / "hf").target


def test_verification_catches_one_perturbed_weight(converted_fake):
    actor, target = converted_fake
    verify_conversion(actor, target)
    perturb(target, "model.layers.1.mlp.down_proj.weight")
    with pytest.raises(
        VerificationError, match=r"1 of \d+ converted tensors differ.*layers\.1\.mlp\.down_proj"
    ):
        verify_conversion(actor, target)


def test_verification_catches_a_changed_config_with_the_same_weights(converted_fake):
    actor, target = converted_fake
    config = json.loads((target / "config.json").read_text())
    (target / "config.json").write_text(json.dumps({**config, "rope_theta": 500.0}))
    with pytest.raises(VerificationError, match="config or architecture"):
        verify_conversion(actor, target)


def test_cli_exits_1_and_marks_the_target_when_verification_fails(tiny_assets, tmp_path, monkeypatch, capsys):
    import opd.checkpoint

    write_sharded_checkpoint(tmp_path / "global_step_1", tiny_assets / "student", (2,))
    real_merge = opd.checkpoint.merge

    def corrupting_merge(checkpoint, target):
        written = real_merge(checkpoint, target)
        perturb(target, "model.embed_tokens.weight")
        return written

    monkeypatch.setattr(opd.checkpoint, "merge", corrupting_merge)
    assert main(["convert", str(tmp_path / "global_step_1"), "--target", str(tmp_path / "hf")]) == 1
    assert "error: verification failed" in capsys.readouterr().err
    assert json.loads((tmp_path / "hf" / MARKER_FILE).read_text())["verified"] is False


def test_target_holding_another_checkpoints_conversion_is_refused(converted_fake, tiny_assets, tmp_path):
    actor, target = converted_fake
    other = tmp_path / "other" / "global_step_5"
    write_sharded_checkpoint(other, tiny_assets / "student", (1,))
    with pytest.raises(
        InputError, match=r"holds a model converted from .*global_step_2.*remove it or choose"
    ):
        convert(other, target, verify=False)


# --- malformed input: path validation only ------------------------------------------------------------


def make_files(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


VALID = {
    "actor/model_world_size_2_rank_0.pt": "",
    "actor/model_world_size_2_rank_1.pt": "",
    "actor/fsdp_config.json": '{"FSDP_version": 2, "world_size": 2}',
    "actor/huggingface/config.json": "{}",
}


def without(name: str) -> dict[str, str]:
    return {k: v for k, v in VALID.items() if k != name}


@pytest.mark.parametrize(
    ("files", "message"),
    [
        (
            {"actor/optim_world_size_1_rank_0.pt": "", "actor/huggingface/config.json": "{}"},
            r"no model shards \(model_world_size_W_rank_R\.pt\) in .*actor; found huggingface/, "
            r"optim_world_size_1_rank_0\.pt: point at a verl checkpoint's global_step_N dir or its actor/ dir",
        ),
        (
            {"global_step_2/actor/fsdp_config.json": "{}", "global_step_4/actor/fsdp_config.json": "{}"},
            r"found step dirs global_step_2/, global_step_4/: point at",
        ),
        (
            without("actor/model_world_size_2_rank_1.pt"),
            r"world size 2 but 1 rank file\(s\), missing model_world_size_2_rank_1\.pt: .*complete checkpoint",
        ),
        (
            {**VALID, "actor/model_world_size_1_rank_0.pt": ""},
            r"shards for several world sizes \(\[1, 2\]\): keep only the files of one save",
        ),
        (without("actor/huggingface/config.json"), r"no huggingface/config\.json in .*actor: verl saves"),
        (without("actor/fsdp_config.json"), r"no fsdp_config\.json in .*actor"),
        (
            {**VALID, "actor/fsdp_config.json": '{"world_size": 4}'},
            r"says world_size 4 but the shard files say 2",
        ),
        (
            {**VALID, "latest_checkpointed_iteration.txt": "7"},
            r"latest_checkpointed_iteration\.txt names step '7' but .*global_step_7 does not exist",
        ),
    ],
    ids=[
        "no-shards",
        "run-dir",
        "missing-rank",
        "two-world-sizes",
        "no-hf-config",
        "no-fsdp-config",
        "world-size-mismatch",
        "latest-step-missing",
    ],
)
def test_malformed_checkpoint_dir_is_a_clear_input_error(tmp_path, files, message):
    make_files(tmp_path, files)
    with pytest.raises(InputError, match=message):
        convert(tmp_path)


def test_missing_path_is_an_input_error_and_the_cli_exits_2(tmp_path, capsys):
    with pytest.raises(InputError, match=r"does not exist: point at a verl checkpoint's global_step_N"):
        convert(tmp_path / "nope")
    with pytest.raises(SystemExit) as exit_info:
        main(["convert", str(tmp_path / "nope")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith(f"error: checkpoint path {tmp_path / 'nope'} does not exist")


@pytest.mark.parametrize(
    ("target_files", "message"),
    [
        ({"config.json": "{}", "model.safetensors": ""}, r"holds a model, not a conversion of"),
        ({"notes.txt": "mine"}, r"is not empty \(notes\.txt\), not a conversion of"),
        ({MARKER_FILE: '{"source": "/elsewhere/actor"}'}, r"holds a model converted from /elsewhere/actor"),
    ],
    ids=["model", "other-files", "other-conversion"],
)
def test_target_holding_something_else_is_refused(tmp_path, target_files, message):
    make_files(tmp_path / "ckpt", VALID)
    make_files(tmp_path / "out", target_files)
    with pytest.raises(InputError, match=message + r".*: remove it or choose another --target"):
        convert(tmp_path / "ckpt", tmp_path / "out")
