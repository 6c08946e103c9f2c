"""Build the tiny agent assets: databases, tasks, a tokenizer, and a tool-calling teacher and a lagging student.

    python -m opd.tiny build --task agent [OUT_DIR] [--seed 0] [--force]      (make tiny-agent)

Layout of a build (default ``~/.cache/opd/tiny-agent/<key>``, or ``$OPD_TINY_AGENT_DIR``)::

    database/database_en/id_<k>/trains/trains.csv   DATABASE_DIR of the runs (DeepPlanning's layout)
    data/train.parquet, data/val.parquet            tool-agent rows (opd.tiny.agent_task)
    teacher/, student/                              save_pretrained model + tokenizer
    accuracy.json                                   tool-loop success and tool-use rate of both models
    build.json                                      manifest, written last

Both models are supervised on the teacher traces (tool call per leg, then the boxed answer) as verl's tool
agent loop lays them out (``opd.tiny.agent_train``): the teacher until it solves nearly every held-out task
through the real loop and tool, the student (smaller) stopped while it still fails most of them, though it
already calls the tool. Agent OPD then has room to show.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from pathlib import Path

from opd.tiny import recipe
from opd.tiny.builder import ACCURACY, MANIFEST, _exclusive_lock, _replace
from opd.tiny.recipe import AGENT_BUILDER_VERSION, agent_build_key

TOOL_CONFIG = "tool_config.yaml"
TRACES = "traces.pt"


def default_agent_dir(seed: int = 0) -> Path:
    if os.environ.get("OPD_TINY_AGENT_DIR"):
        return Path(os.environ["OPD_TINY_AGENT_DIR"]).expanduser()
    return Path.home() / ".cache" / "opd" / "tiny-agent" / agent_build_key(seed)


def is_complete_agent_build(out_dir: Path, seed: int) -> bool:
    try:
        manifest = json.loads((out_dir / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return manifest.get("key") == agent_build_key(seed) and (out_dir / ACCURACY).is_file()


def build_agent(out_dir: str | os.PathLike | None = None, seed: int = 0, force: bool = False) -> dict:
    """Build (or reuse) the agent assets in ``out_dir``; returns accuracy.json."""
    out = Path(out_dir).expanduser().absolute() if out_dir is not None else default_agent_dir(seed).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(out.parent / f".{out.name}.lock"):
        if not force and is_complete_agent_build(out, seed):
            print(f"opd.tiny: reusing the agent build in {out} (key {agent_build_key(seed)})", flush=True)
            return json.loads((out / ACCURACY).read_text())
        if not force and out.exists() and not (out / MANIFEST).exists() and any(out.iterdir()):
            raise FileExistsError(
                f"{out} is not empty and is not a tiny agent build (no {MANIFEST}); choose another "
                "directory or pass --force"
            )
        staging = out.parent / f".{out.name}.building-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        try:
            accuracy = _build_into(staging, seed)
            manifest = {"key": agent_build_key(seed), "builder_version": AGENT_BUILDER_VERSION, "seed": seed}
            (staging / MANIFEST).write_text(
                json.dumps({**manifest, "recipe": recipe.agent_recipe()}, indent=2) + "\n"
            )
            # the build's own tool config names the staging directory: the runs write theirs
            (staging / TOOL_CONFIG).unlink()
            (staging / TRACES).unlink()
            _replace(out, staging)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    from opd.tiny.builder import format_table

    print(format_table(accuracy), flush=True)
    return accuracy


def write_tool_config(root: Path) -> Path:
    """The travel tool config of the build (``query_train_info`` only), as an agent run writes it."""
    from omegaconf import OmegaConf

    from opd.agent.config import AgentConfig, tool_config
    from opd.tiny.agent_task import TOOL

    agent = AgentConfig(tools="travel", database_dir=str(root / "database"), tool_names=(TOOL,))
    path = root / TOOL_CONFIG
    OmegaConf.save(OmegaConf.create(tool_config(agent, recipe.AGENT_MAX_TOOL_CHARS)), path)
    return path


def corpus(rows: list[dict], tool_config_path: Path) -> list[str]:
    """Chat-template text of teacher traces (tool answers from the real tool), to train the tokenizer on."""
    import asyncio

    import jinja2
    from verl.tools.utils.tool_registry import initialize_tools_from_config

    from opd.tiny.agent_task import TOOL, assistant_turns
    from opd.tiny.tokenizer import CHAT_TEMPLATE

    (tool,) = initialize_tools_from_config(str(tool_config_path))
    schema = tool.tool_schema.model_dump(exclude_unset=True, exclude_none=True)
    template = jinja2.Environment().from_string(CHAT_TEMPLATE)

    async def answer(row, arguments):
        instance_id, _ = await tool.create(
            create_kwargs=row["extra_info"]["tools_kwargs"][TOOL]["create_kwargs"]
        )
        try:
            response, _, _ = await tool.execute(instance_id, arguments)
        finally:
            await tool.release(instance_id)
        return response.text

    texts = []
    for row in rows:
        messages = [dict(m) for m in row["prompt"]]
        turns = assistant_turns(row)
        for turn in turns[:-1]:
            call = json.loads(turn.split("\n")[1])
            messages.append({"role": "assistant", "content": turn})
            messages.append({"role": "tool", "content": asyncio.run(answer(row, call["arguments"]))})
        messages.append({"role": "assistant", "content": turns[-1]})
        texts.append(template.render(messages=messages, tools=[schema], add_generation_prompt=False))
    return texts


def _build_into(root: Path, seed: int) -> dict:
    """Databases and rows, tokenizer, traces through verl's loop, then both models in parallel processes."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    import torch

    from opd.tiny.agent_task import make_splits
    from opd.tiny.agent_train import loop_config, sft_tensors, trace_outputs
    from opd.tiny.task import write_splits
    from opd.tiny.tokenizer import train_tokenizer
    from opd.tiny.train import make_model

    started = time.perf_counter()
    random.seed(seed)
    torch.manual_seed(seed)
    splits = make_splits(seed, root / "database", recipe.AGENT_N_TRAIN, recipe.AGENT_N_VAL)
    write_splits(splits, root / "data")
    tool_config_path = write_tool_config(root)
    train_rows = splits["train"].to_dict("records")
    tokenizer = train_tokenizer(
        corpus(train_rows, tool_config_path),
        recipe.AGENT_VOCAB_SIZE,
        split_words=False,
        max_length=recipe.AGENT_MAX_POSITIONS,
    )
    for role, spec in (("teacher", recipe.AGENT_TEACHER), ("student", recipe.AGENT_STUDENT)):
        tokenizer.save_pretrained(root / role)
        # verl's model config reads config.json: the untrained model stands in until its worker saves it
        make_model(
            spec, tokenizer, seed, max_positions=recipe.AGENT_MAX_POSITIONS, tie_embeddings=False
        ).save_pretrained(root / role)
    config = loop_config(
        root / "teacher", tool_config_path, recipe.AGENT_PROMPT_LENGTH, recipe.AGENT_RESPONSE_LENGTH
    )
    outputs = trace_outputs(config, tokenizer, train_rows)
    lengths = [len(o.prompt_ids) + len(o.response_ids) for o in outputs]
    torch.save(sft_tensors(outputs, tokenizer.pad_token_id), root / TRACES)
    print(
        f"opd.tiny: {len(outputs)} agent traces through verl's tool loop (tokens per trace: mean "
        f"{sum(lengths) / len(lengths):.0f}, max {max(lengths)}; {len(tokenizer)}-token vocabulary); "
        "training teacher and student",
        flush=True,
    )
    jobs = {
        "teacher": (recipe.AGENT_TEACHER, recipe.AGENT_TEACHER_SFT, seed),
        "student": (recipe.AGENT_STUDENT, recipe.AGENT_STUDENT_SFT, seed + 1),
    }
    with ProcessPoolExecutor(max_workers=2, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {role: pool.submit(train_agent_model, role, str(root), *job) for role, job in jobs.items()}
        results = {role: future.result() for role, future in futures.items()}
    teacher, student = results["teacher"]["val_accuracy"], results["student"]["val_accuracy"]
    if teacher < recipe.AGENT_TEACHER_MIN_ACCURACY or student > recipe.AGENT_STUDENT_MAX_ACCURACY:
        raise RuntimeError(
            f"tiny agent build missed its targets (teacher {teacher:.3f} < {recipe.AGENT_TEACHER_MIN_ACCURACY} "
            f"or student {student:.3f} > {recipe.AGENT_STUDENT_MAX_ACCURACY}); the recipe needs retuning"
        )
    accuracy = {
        "builder_version": AGENT_BUILDER_VERSION,
        "key": agent_build_key(seed),
        "seed": seed,
        **results,
        "vocab_size": len(tokenizer),
        "n_train": len(splits["train"]),
        "n_val": len(splits["val"]),
        "trace_tokens_mean": round(sum(lengths) / len(lengths), 1),
        "seconds": round(time.perf_counter() - started, 1),
    }
    (root / ACCURACY).write_text(json.dumps(accuracy, indent=2) + "\n")
    return accuracy


def train_agent_model(role: str, build_dir: str, spec, sft_recipe, seed: int) -> dict:
    """Worker (one process per model, one thread each): SFT on the traces, evaluated through the loop."""
    from dataclasses import asdict

    import pandas as pd
    import torch
    from transformers import AutoTokenizer

    from opd.tiny.agent_train import evaluate_agent, labelled_loss, loop_config
    from opd.tiny.train import count_params, make_model, sft

    torch.set_num_threads(1)
    root = Path(build_dir)
    tokenizer = AutoTokenizer.from_pretrained(root / role)
    config = loop_config(
        root / role, root / TOOL_CONFIG, recipe.AGENT_PROMPT_LENGTH, recipe.AGENT_RESPONSE_LENGTH
    )
    val_rows = pd.read_parquet(root / "data" / "val.parquet").to_dict("records")
    # untied: with tied embeddings, the early uniform guesses over cities, dates and train letters pull
    # their embeddings together, and copying them out of the context stalls for hundreds of steps
    model = make_model(spec, tokenizer, seed, max_positions=recipe.AGENT_MAX_POSITIONS, tie_embeddings=False)
    train = torch.load(root / TRACES)
    metrics = sft(
        model,
        tokenizer,
        train,
        [],
        [],
        sft_recipe,
        seed,
        role,
        evaluate_fn=lambda m: evaluate_agent(config, tokenizer, m, val_rows),
        loss_fn=labelled_loss,
    )
    model.save_pretrained(root / role)
    return {**metrics, "params": count_params(model), **asdict(spec)}
