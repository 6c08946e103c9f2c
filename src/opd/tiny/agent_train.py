"""Teach the tiny models the agent task: traces through verl's own tool agent loop, SFT, loop evaluation.

The token layout of a multi-turn rollout is verl's (``ToolAgentLoop``: the prompt rendered with the tool
schemas, each assistant turn as generated, each tool answer rendered as its own chat turn with the system
prefix removed). The SFT traces are made by that same loop, with a server that answers each turn with the
teacher trace's text (``TraceServer``), and real tools answering from the task's database; so a model trained
on them meets, token for token, the contexts it will see in training rollouts. Labels cover the assistant
turns only (``response_mask`` = 1), as the OPD loss does.

Evaluation runs the loop again with the ``hf`` rollout server serving the model being trained (greedy), so
the accuracy the build reports is the tool-using success the OPD run starts from.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import torch

from opd.tiny.recipe import AGENT_MAX_TOOL_CHARS

IGNORE_INDEX = -100
MAX_TURN_TOKENS = 64  # per assistant turn: a tool call is about 40 tokens, the answer about 15
GREEDY = {"temperature": 0.0, "top_p": 1.0, "top_k": -1, "repetition_penalty": 1.0, "logprobs": False}


def loop_config(model_dir: Path, tool_config_path: Path, prompt_length: int, response_length: int):
    """The verl config an OPD run of the tiny agent task composes (its rollout section is what the loop reads)."""
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    import opd.config  # noqa: F401  (the opd.* resolvers)

    overrides = [
        "platform=cpu",
        f"actor_rollout_ref.model.path={model_dir}",
        f"data.max_prompt_length={prompt_length}",
        f"data.max_response_length={response_length}",
        "data.return_raw_chat=true",
        "actor_rollout_ref.rollout.multi_turn.enable=true",
        "actor_rollout_ref.rollout.multi_turn.format=hermes",
        "actor_rollout_ref.rollout.multi_turn.max_assistant_turns=4",
        f"actor_rollout_ref.rollout.multi_turn.max_tool_response_length={AGENT_MAX_TOOL_CHARS}",
        f"actor_rollout_ref.rollout.multi_turn.tool_config_path={tool_config_path}",
    ]
    with initialize_config_module(config_module="opd.config", version_base=None):
        config = compose(config_name="opd_trainer", overrides=overrides)
    OmegaConf.resolve(config)
    return config


def _tool_agent_loop(config, server, tokenizer):
    from verl.experimental.agent_loop.agent_loop import DictConfigWrap
    from verl.experimental.agent_loop.tool_agent_loop import ToolAgentLoop
    from verl.utils.dataset.rl_dataset import RLHFDataset

    return ToolAgentLoop(
        trainer_config=DictConfigWrap(config),
        server_manager=server,
        tokenizer=tokenizer,
        processor=None,
        dataset_cls=RLHFDataset,
        data_config=DictConfigWrap(config.data),
    )


class TraceServer:
    """Answers the loop's turns with a trace's assistant texts, in order (each closed by the eos token)."""

    def __init__(self, tokenizer, turns: list[str]):
        self.turns = [tokenizer.encode(t, add_special_tokens=False) + [tokenizer.eos_token_id] for t in turns]
        self.calls = 0

    async def generate(self, request_id, prompt_ids, sampling_params, image_data=None, video_data=None):
        from verl.workers.rollout.replica import TokenOutput

        ids = self.turns[self.calls]
        self.calls += 1
        return TokenOutput(token_ids=ids, log_probs=[0.0] * len(ids))


async def _run_rows(config, tokenizer, rows: list[dict], server_for, concurrency: int = 64) -> list:
    """Run the tool agent loop over ``rows`` (``server_for(row)`` serves each); outputs in row order."""
    semaphore = asyncio.Semaphore(concurrency)

    async def one(row):
        async with semaphore:
            loop = _tool_agent_loop(config, server_for(row), tokenizer)
            return await loop.run(
                dict(GREEDY, max_tokens=MAX_TURN_TOKENS),
                raw_prompt=list(row["prompt"]),
                tools_kwargs=row["extra_info"]["tools_kwargs"],
            )

    return await asyncio.gather(*[one(row) for row in rows])


def trace_outputs(config, tokenizer, rows: list[dict]) -> list:
    """verl's loop outputs of the teacher traces of ``rows``; refuses a trace the loop did not follow."""
    from opd.tiny.agent_task import assistant_turns

    servers = {}

    def server_for(row):
        servers[id(row)] = TraceServer(tokenizer, assistant_turns(row))
        return servers[id(row)]

    outputs = asyncio.run(_run_rows(config, tokenizer, rows, server_for))
    for row, output in zip(rows, outputs, strict=True):
        server = servers[id(row)]
        text = tokenizer.decode(output.response_ids)
        answered = all(
            f'"marketingTransportNo": "{number}"' in text
            for number in row["reward_model"]["ground_truth"].split(", ")
        )
        if server.calls != len(server.turns) or not answered:
            raise RuntimeError(
                f"the loop took {server.calls} of the trace's {len(server.turns)} turns for "
                f"{row['extra_info']['task_id']} and the tool's answers {'hold' if answered else 'lack'} its "
                f"trains: a tool call was not parsed or the tool did not answer from the database:\n{text[-800:]}"
            )
    return outputs


def sft_tensors(outputs: list, pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input ids, attention mask and labels (assistant tokens only) of loop outputs."""
    length = max(len(o.prompt_ids) + len(o.response_ids) for o in outputs)
    input_ids = torch.full((len(outputs), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(outputs), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(outputs), length), dtype=torch.long)
    for i, o in enumerate(outputs):
        ids = list(o.prompt_ids) + list(o.response_ids)
        n_prompt = len(o.prompt_ids)
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attention_mask[i, : len(ids)] = 1
        response = torch.tensor(list(o.response_ids))
        mask = torch.tensor(list(o.response_mask), dtype=torch.bool)
        labels[i, n_prompt : len(ids)] = torch.where(mask, response, torch.tensor(IGNORE_INDEX))
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def labelled_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The causal-LM loss of ``model(**batch).loss``, computed cheaply: the batch is cut to its longest row
    (rows are right-padded), the prefix its rows share (the system turn with the tool schema) is run once
    and its keys and values broadcast to every row, and vocabulary logits are computed at labelled
    positions only."""
    from transformers import DynamicCache

    length = int(batch["attention_mask"].sum(dim=1).max())
    input_ids, attention_mask = batch["input_ids"][:, :length], batch["attention_mask"][:, :length]
    targets = batch["labels"][:, 1:length]
    shared = int((input_ids == input_ids[:1]).all(dim=0).long().cumprod(dim=0).sum())
    shared = min(shared, int((targets != IGNORE_INDEX).long().argmax(dim=1).min()))  # no labelled position
    rows = input_ids.shape[0]
    if shared < 2 or rows < 2:
        hidden = model.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    else:
        cache = DynamicCache()
        head = model.model(input_ids=input_ids[:1, :shared], past_key_values=cache, use_cache=True)
        for layer in cache.layers:
            layer.keys = layer.keys.expand(rows, -1, -1, -1)
            layer.values = layer.values.expand(rows, -1, -1, -1)
        tail = model.model(
            input_ids=input_ids[:, shared:],
            attention_mask=attention_mask,
            past_key_values=cache,
            position_ids=torch.arange(shared, length).expand(rows, -1),
            use_cache=True,
        )
        hidden = torch.cat([head.last_hidden_state.expand(rows, -1, -1), tail.last_hidden_state], dim=1)
    hidden = hidden[:, :-1]
    keep = targets != IGNORE_INDEX
    logits = model.lm_head(hidden[keep])
    return torch.nn.functional.cross_entropy(logits.float(), targets[keep])


class ModelServer:
    """The ``hf`` rollout server (batched, greedy) serving an in-memory model that is being trained."""

    def __init__(self, config, model):
        from opd.backends.cpu.hf_rollout import HFRolloutServer

        self.server = HFRolloutServer(
            config=config.actor_rollout_ref.rollout, model_config=config.actor_rollout_ref.model
        )
        self.server.model = model

    async def generate(self, request_id, prompt_ids, sampling_params, image_data=None, video_data=None):
        return await self.server.generate(
            prompt_ids=prompt_ids, sampling_params=sampling_params, request_id=request_id
        )


def evaluate_agent(config, tokenizer, model, rows: list[dict]) -> dict[str, float]:
    """Greedy success of ``model`` through the tool agent loop, and its tool-use rates."""
    from verl.experimental.agent_loop import tool_parser

    from opd.tiny.agent_task import compute_score

    was_training = model.training
    model.eval()
    server = ModelServer(config, model)
    # verl logs an ERROR line per call it cannot parse; a model early in SFT writes hundreds per evaluation,
    # which would bury the build's progress lines: they are counted instead (a test-worthy number, not noise)
    parser_log = logging.getLogger(tool_parser.__file__)
    malformed = _Counter()
    parser_log.addFilter(malformed)
    try:
        outputs = asyncio.run(_run_rows(config, tokenizer, rows, lambda row: server))
    finally:
        parser_log.removeFilter(malformed)
        model.train(was_training)
    scores, called = [], []
    for row, output in zip(rows, outputs, strict=True):
        text = tokenizer.decode(output.response_ids, skip_special_tokens=True)
        scores.append(compute_score(row["data_source"], text, row["reward_model"]["ground_truth"])["acc"])
        called.append(0 in output.response_mask)  # a tool answered at least once
    return {
        "val_accuracy": sum(scores) / len(rows),
        "format_rate": sum(called) / len(rows),
        "malformed_calls": malformed.count,
    }


class _Counter(logging.Filter):
    """Drops the records it sees and counts them."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def filter(self, record: logging.LogRecord) -> bool:
        self.count += 1
        return False
