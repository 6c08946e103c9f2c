"""The ``hf`` rollout backend: verl's async agent loop served by transformers ``generate``.

verl 0.7.1 only registers vLLM, SGLang and TRT-LLM, none of which runs without a GPU. This backend
plugs into the same two registries (``actor_rollout_ref.rollout.name=hf``) so that CPU tests and
demos exercise verl's real agent loop, reward loop and weight sync. It is a correctness backend for
tiny models, not a throughput engine: one model copy per replica, on CPU.

Pieces, mirroring vLLM's:
- ``HFRolloutServer``: a Ray actor (also usable without Ray) with verl's token-in/token-out
  ``generate``. Concurrent requests with equal sampling settings are batched into one ``generate``.
- ``HFReplica``: launches one server per replica (``RolloutReplicaRegistry``).
- ``HFServerAdapter``: lives in the FSDP actor worker and ships weights to the server after each
  step (``_ROLLOUT_REGISTRY[("hf", "async")]``).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

logger = logging.getLogger(__name__)

ROLLOUT_NAME = "hf"


@dataclass(frozen=True)
class SamplingKey:
    """Requests that share these settings can be generated in one batch."""

    temperature: float
    top_p: float
    top_k: int
    repetition_penalty: float
    max_new_tokens: int
    want_logprobs: bool


@dataclass
class _Request:
    prompt_ids: list[int]
    key: SamplingKey
    future: asyncio.Future


def _as_dataclass(config):
    """verl passes these configs either as dataclasses or as DictConfigs carrying a ``_target_``."""
    from omegaconf import DictConfig
    from verl.utils.config import omega_conf_to_dataclass

    return omega_conf_to_dataclass(config) if isinstance(config, DictConfig) else config


class HFRolloutServer:
    """Token-in/token-out generation for verl's agent loop, with transformers on CPU."""

    def __init__(self, config, model_config, replica_rank: int = 0, device: str = "cpu"):
        from transformers import AutoModelForCausalLM

        self.config = _as_dataclass(config)
        self.model_config = _as_dataclass(model_config)
        self.replica_rank = replica_rank
        self.device = torch.device(device)
        model_path = self.model_config.local_path
        self.model = AutoModelForCausalLM.from_pretrained(model_path, torch_dtype=torch.float32).to(
            self.device
        )
        self.model.eval()
        generation_config = self.model.generation_config
        eos = generation_config.eos_token_id if generation_config.eos_token_id is not None else None
        if eos is None:
            eos = self.model_config.tokenizer.eos_token_id
        self.eos_token_ids = set(eos if isinstance(eos, list) else [eos])
        pad = generation_config.pad_token_id
        self.pad_token_id = pad if pad is not None else self.model_config.tokenizer.pad_token_id
        self.global_steps: int | None = None
        # One thread owns the model: generation batches and weight loads never overlap.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hf-rollout")
        self._pending: list[_Request] = []
        self._drainer: asyncio.Task | None = None

    # ---- generation -------------------------------------------------------------------------------

    def _max_new_tokens(self, prompt_len: int, sampling_params: dict[str, Any]) -> int:
        if "max_tokens" in sampling_params:
            wanted = int(sampling_params["max_tokens"])
        elif "max_new_tokens" in sampling_params:
            wanted = int(sampling_params["max_new_tokens"])
        else:
            wanted = min(
                self.config.response_length,
                self.config.prompt_length + self.config.response_length - prompt_len,
            )
        context_left = (
            self.config.max_model_len or (self.config.prompt_length + self.config.response_length)
        ) - (prompt_len)
        return max(0, min(wanted, context_left))

    async def generate(
        self,
        prompt_ids: list[int],
        sampling_params: dict[str, Any],
        request_id: str | None = None,
        image_data: Any = None,
        video_data: Any = None,
        priority: int = 0,
    ):
        """Generate one response; verl's ``AsyncLLMServerManager`` calls this for every turn."""
        from verl.workers.rollout.replica import TokenOutput

        if image_data is not None or video_data is not None:
            raise ValueError("the hf rollout backend serves text-only models; got image/video inputs")
        prompt_ids = [int(t) for t in prompt_ids]
        key = SamplingKey(
            temperature=float(sampling_params.get("temperature", 1.0)),
            top_p=float(sampling_params.get("top_p", 1.0)),
            top_k=int(sampling_params.get("top_k", -1) or -1),
            repetition_penalty=float(sampling_params.get("repetition_penalty", 1.0)),
            max_new_tokens=self._max_new_tokens(len(prompt_ids), sampling_params),
            want_logprobs=bool(sampling_params.get("logprobs", False)),
        )
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._pending.append(_Request(prompt_ids, key, future))
        if self._drainer is None or self._drainer.done():
            self._drainer = loop.create_task(self._drain())
        token_ids, log_probs = await future
        return TokenOutput(
            token_ids=token_ids,
            log_probs=log_probs if key.want_logprobs else None,
            stop_reason="completed",
            extra_fields={"global_steps": self.global_steps},
        )

    async def _drain(self) -> None:
        """Serve everything queued; requests arriving during a batch form the next batch."""
        loop = asyncio.get_running_loop()
        while self._pending:
            batch, self._pending = self._pending, []
            groups: dict[SamplingKey, list[_Request]] = defaultdict(list)
            for request in batch:
                groups[request.key].append(request)
            for key, requests in groups.items():
                try:
                    results = await loop.run_in_executor(
                        self._executor, self.generate_batch, [r.prompt_ids for r in requests], key
                    )
                except Exception as error:  # surface the failure to every waiting caller
                    for request in requests:
                        if not request.future.done():
                            request.future.set_exception(error)
                    continue
                for request, result in zip(requests, results, strict=True):
                    if not request.future.done():
                        request.future.set_result(result)

    @torch.no_grad()
    def generate_batch(
        self, prompts: list[list[int]], key: SamplingKey
    ) -> list[tuple[list[int], list[float]]]:
        """Left-padded batched sampling; returns (token_ids ending at EOS inclusive, their log-probs)."""
        if key.max_new_tokens == 0:
            return [([], []) for _ in prompts]
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            input_ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
            attention_mask[row, width - len(prompt) :] = 1
        do_sample = key.temperature > 0
        sampling = (
            dict(
                do_sample=True,
                temperature=key.temperature,
                top_p=key.top_p,
                top_k=key.top_k if key.top_k > 0 else 0,
            )
            if do_sample
            else dict(do_sample=False, temperature=None, top_p=None, top_k=None)
        )
        out = self.model.generate(
            input_ids=input_ids.to(self.device),
            attention_mask=attention_mask.to(self.device),
            max_new_tokens=key.max_new_tokens,
            eos_token_id=sorted(self.eos_token_ids),
            pad_token_id=self.pad_token_id,
            repetition_penalty=key.repetition_penalty,
            output_logits=key.want_logprobs,
            return_dict_in_generate=True,
            **sampling,
        )
        new_tokens_B_T = out.sequences[:, width:].cpu()
        if key.want_logprobs:
            logits_B_T_V = torch.stack(out.logits, dim=1).float().cpu()
            logp_B_T = (
                torch.log_softmax(logits_B_T_V, dim=-1).gather(-1, new_tokens_B_T.unsqueeze(-1)).squeeze(-1)
            )
        results = []
        for row in range(len(prompts)):
            tokens = new_tokens_B_T[row].tolist()
            length = len(tokens)
            for t, token in enumerate(tokens):
                if token in self.eos_token_ids:
                    length = t + 1
                    break
            logps = logp_B_T[row, :length].tolist() if key.want_logprobs else []
            results.append((tokens[:length], logps))
        return results

    # ---- weights and lifecycle (called by the adapter and by verl's replica/manager) ---------------

    async def update_weights(self, named_tensors: dict[str, torch.Tensor], global_steps: int | None = None):
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._load_weights, named_tensors)
        if global_steps is not None:
            self.global_steps = global_steps

    def _load_weights(self, named_tensors: dict[str, torch.Tensor]) -> None:
        state = self.model.state_dict()
        unknown = sorted(set(named_tensors) - set(state))
        if unknown:
            raise KeyError(
                f"hf rollout: weights for unknown parameters {unknown[:5]} (model {type(self.model)})"
            )
        with torch.no_grad():
            for name, tensor in named_tensors.items():
                state[name].copy_(tensor.to(state[name].dtype))
        if getattr(self.model.config, "tie_word_embeddings", False):
            self.model.tie_weights()

    async def set_global_steps(self, global_steps: int):
        self.global_steps = global_steps

    async def wake_up(self):
        """Weights stay resident: a tiny CPU model has nothing to free."""

    async def sleep(self):
        """See ``wake_up``."""

    async def clear_kv_cache(self):
        """``generate`` keeps no cache between requests."""

    async def wait_for_requests_to_drain(self):
        while self._drainer is not None and not self._drainer.done():
            await self._drainer

    async def abort_all_requests(self, reset_prefix_cache: bool = True) -> dict[str, Any]:
        return {"aborted_count": 0, "request_ids": []}

    async def resume_generation(self):
        """Nothing is ever paused."""

    async def abort_request(self, request_id: str, reset_prefix_cache: bool = True) -> dict[str, Any]:
        return {"aborted": False, "request_id": request_id, "error": "hf rollout does not abort requests"}

    async def start_profile(self, **kwargs):
        """Profiling is not supported by this backend."""

    async def stop_profile(self):
        """Profiling is not supported by this backend."""


def server_actor_name(replica_rank: int) -> str:
    return f"hf_rollout_server_{replica_rank}"


def _load_replica_class():
    """Imported lazily: verl's replica module pulls in Ray and the worker stack."""
    import ray
    from verl.workers.rollout.replica import RolloutMode, RolloutReplica

    class HFReplica(RolloutReplica):
        """One ``HFRolloutServer`` per replica, next to the replica's first worker."""

        async def launch_servers(self):
            if self.rollout_mode != RolloutMode.HYBRID:
                raise NotImplementedError("the hf rollout backend supports hybrid (colocated) rollouts only")
            node_id = await self.workers[0].__ray_call__.remote(
                lambda worker: ray.get_runtime_context().get_node_id()
            )
            name = server_actor_name(self.replica_rank)
            server = (
                ray.remote(HFRolloutServer)
                .options(
                    name=name,
                    num_cpus=0,
                    max_concurrency=self.max_concurrency,
                    scheduling_strategy=ray.util.scheduling_strategies.NodeAffinitySchedulingStrategy(
                        node_id=node_id, soft=False
                    ),
                )
                .remote(config=self.config, model_config=self.model_config, replica_rank=self.replica_rank)
            )
            self.servers = [server]
            self._server_handle = server
            self._server_address = f"ray://{name}"

    return HFReplica


def _adapter_base():
    from verl.workers.rollout.base import BaseRollout

    return BaseRollout


class HFServerAdapter(_adapter_base()):
    """Worker-side half: forwards the trainer's weights to this replica's server after each step."""

    def __init__(self, config, model_config, device_mesh, replica_rank: int = -1):
        super().__init__(config, model_config, device_mesh)
        rank = int(os.environ.get("RANK", 0))
        rollout_world_size = (
            self.config.tensor_model_parallel_size
            * self.config.data_parallel_size
            * self.config.pipeline_model_parallel_size
        )
        self.replica_rank = rank // rollout_world_size if replica_rank == -1 else replica_rank
        self.rollout_rank = rank % rollout_world_size
        self._server = None

    def _server_handle(self):
        import ray

        if self._server is None:
            self._server = ray.get_actor(server_actor_name(self.replica_rank))
        return self._server

    async def resume(self, tags: list[str]):
        """Nothing to page back in."""

    async def release(self):
        """Nothing to page out."""

    @torch.no_grad()
    async def update_weights(self, weights, global_steps: int | None = None, **kwargs):
        # Every rank must drain the generator: with FSDP each full_tensor() is a collective.
        named_tensors = {name: tensor.detach().to("cpu", copy=True) for name, tensor in weights}
        if self.rollout_rank != 0:
            return
        await self._server_handle().update_weights.remote(named_tensors, global_steps=global_steps)


def register() -> None:
    """Make ``rollout.name=hf`` known to verl in this process (idempotent, adds a name only)."""
    from verl.workers.rollout import base
    from verl.workers.rollout.replica import RolloutReplicaRegistry

    base._ROLLOUT_REGISTRY[(ROLLOUT_NAME, "async")] = f"{__name__}.HFServerAdapter"
    RolloutReplicaRegistry.register(ROLLOUT_NAME, _load_replica_class)
