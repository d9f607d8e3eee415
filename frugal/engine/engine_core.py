"""EngineCore: the step loop shared by the sync `LLM` and the async server engine.

schedule -> execute -> update -> detokenise, once per `step()`. Owns the tokenizer, one
IncrementalDetokenizer per sequence, the Scheduler and the ModelRunner. A request with `n > 1` fans
out into n sequences `"{request_id}#{i}"` (seeds `seed + i`) that share the prompt's cached prefix.

Invariants: a request id is unique among unfinished requests; every sequence the scheduler finishes
yields exactly one final CompletionDelta (finish_reason set) and its state is dropped.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from frugal.config import EngineConfig
from frugal.engine.detokenizer import IncrementalDetokenizer
from frugal.engine.scheduling import build_scheduler, make_swapper
from frugal.errors import ConfigError, InvalidRequestError
from frugal.model.generation_config import load_generation_defaults
from frugal.model.arch_config import load_arch_config
from frugal.model.loader import load_model, resolve_dtype, resolve_model_path
from frugal.model.tokenizer import load_tokenizer
from frugal.outputs import CompletionDelta, Logprob, RequestMetrics, TokenLogprobs
from frugal.request import Request, RequestStatus
from frugal.runner.kv_cache import allocate_kv_caches, kv_cache_bytes_per_block
from frugal.runner.model_runner import ModelRunner
from frugal.spec.build import build_spec_decoder
from frugal.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


@dataclass
class _Sequence:
    """One generated sequence (a request, or one of its n samples) as the engine follows it."""

    request: Request
    parent_id: str
    index: int
    detokenizer: IncrementalDetokenizer
    num_emitted_tokens: int = 0


@dataclass
class EngineStats:
    num_steps: int = 0
    num_prompt_tokens: int = 0
    num_generated_tokens: int = 0
    num_finished_requests: int = 0
    num_aborted_requests: int = 0
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class EngineSnapshot:
    """The engine's load at one instant (read by the server's /metrics from another thread; frozen,
    so a reader never sees a half-updated one)."""

    num_waiting: int          # requests (sequences) queued for a seat, preempted ones included
    num_running: int          # sequences holding a seat
    num_used_blocks: int      # KV blocks referenced by a running or waiting request
    num_free_blocks: int      # KV blocks free to allocate (prefix-cached ones included)
    num_blocks: int
    num_preemptions: int      # since start
    num_steps: int
    num_unfinished_sequences: int


def _resolve_device(name: str) -> torch.device:
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but torch sees no CUDA device")
    return device


class EngineCore:
    def __init__(self, config: EngineConfig, clock: Callable[[], float] = time.monotonic):
        """`clock` times requests and scheduling (a trace replay passes one that skips idle gaps)."""
        self.config = config
        model_config = config.model
        self.device = _resolve_device(model_config.device)
        self.model_dir = resolve_model_path(model_config.model, model_config.revision)
        self.arch = load_arch_config(self.model_dir)
        self.tokenizer = load_tokenizer(self.model_dir)
        self.generation_defaults = load_generation_defaults(self.model_dir, self.arch.eos_token_ids)
        self.eos_token_ids = frozenset(self.generation_defaults.eos_token_ids)
        self.dtype = resolve_dtype(model_config.dtype, self.arch, self.device)
        torch.manual_seed(model_config.seed)

        block_size = config.cache.block_size
        self.max_model_len = self._resolve_max_model_len()
        bytes_per_block = kv_cache_bytes_per_block(self.arch, block_size, self.dtype)
        num_blocks = config.cache.kv_cache_memory_bytes // bytes_per_block
        blocks_per_seq = -(-self.max_model_len // block_size)
        # Never reserve more than every seat at full length could use.
        num_blocks = min(num_blocks, blocks_per_seq * config.scheduler.max_num_seqs)
        if num_blocks * block_size < self.max_model_len:
            capacity = num_blocks * block_size
            if model_config.max_model_len is not None or capacity < block_size:
                raise ConfigError(
                    f"kv_cache_memory={config.cache.kv_cache_memory_bytes} bytes holds {capacity} tokens "
                    f"({bytes_per_block} bytes per block of {block_size}), fewer than max_model_len="
                    f"{self.max_model_len}; raise kv_cache_memory or lower max_model_len")
            logger.warning("KV cache holds %d tokens; lowering max_model_len from %d", capacity, self.max_model_len)
            self.max_model_len = capacity
        self.num_blocks = num_blocks
        self.model = load_model(self.model_dir, self.arch, self.dtype, self.device, model_config.attention_backend,
                                max_position=self.max_model_len, quantization=config.quant,
                                quant_activations=model_config.quant_activations)
        scheduler_config = replace(config.scheduler, max_model_len=self.max_model_len)
        self.kv_caches = allocate_kv_caches(self.arch, num_blocks, block_size, self.dtype, self.device)
        self.swapper = make_swapper(config.cache, self.kv_caches, bytes_per_block)
        # Speculative decoding (frugal.spec) plugs in here: a proposer hook after each step and the
        # runner's verifier; without it every step decodes one token per request.
        self.spec = build_spec_decoder(config.speculative, target_arch=self.arch, dtype=self.dtype,
                                       device=self.device, block_size=block_size, num_blocks=num_blocks,
                                       max_num_seqs=config.scheduler.max_num_seqs, max_model_len=self.max_model_len,
                                       attention_backend=model_config.attention_backend, target_model=self.model)
        self.runner = ModelRunner(self.model, self.kv_caches, block_size, self.device, self.swapper,
                                  verifier=self.spec.verify, hidden_state_observer=self.spec.hidden_state_observer,
                                  model_forward=self._decode_forward(model_config))
        self.scheduler = build_scheduler(scheduler_config, config.cache, num_blocks, self.runner, self.swapper,
                                         self.arch.vocab_size, self.max_model_len, clock=clock,
                                         metadata={"model": str(self.model_dir), "device": str(self.device),
                                                   "dtype": str(self.dtype)})
        self._sequences: dict[str, _Sequence] = {}
        self._children: dict[str, list[str]] = {}
        self.stats = EngineStats()
        logger.info("engine ready: %s, %s on %s, %d KV blocks of %d tokens, max_model_len %d",
                    self.arch.architecture, self.dtype, self.device, num_blocks, block_size, self.max_model_len)

    def _decode_forward(self, model_config):
        """The runner's forward: the torch.compile'd decode step when `compile` is on (and supported,
        else a warning), else the native C++ decode step when `native_decode` is on and the model
        qualifies, else None (the eager model)."""
        if model_config.compile:
            return self._compiled_forward()
        if not model_config.native_decode or self.device.type != "cpu":
            return None
        from frugal.runner.native_decode import NativeDecode, native_decode_unsupported

        reason = native_decode_unsupported(self.model)
        if reason is not None:
            logger.info("decode steps run eagerly: %s", reason)
            return None
        logger.info("decode steps run natively (one C++ call per step)")
        return NativeDecode(self.model)

    def _compiled_forward(self):
        from frugal.runner.compiled_decode import CompiledDecode, compile_supported

        reason = compile_supported(self.model)
        if reason is not None:
            logger.warning("compile requested but not used: %s; running eagerly", reason)
            return None
        logger.info("decode steps will run torch.compile'd (the first decode step compiles; ~1 min cold)")
        return CompiledDecode(self.model)

    def _resolve_max_model_len(self) -> int:
        limit = self.arch.max_position_embeddings
        requested = self.config.model.max_model_len
        if requested is None:
            return min(limit, self.config.scheduler.max_model_len) if limit else self.config.scheduler.max_model_len
        if limit and requested > limit:
            raise ConfigError(f"max_model_len={requested} exceeds the model's max_position_embeddings={limit}")
        return requested

    # ---- requests -------------------------------------------------------------------------------

    def tokenize_prompt(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            token_ids = self.tokenizer.encode(prompt)
        elif isinstance(prompt, (list, tuple)):
            token_ids = list(prompt)
            vocab_size = self.arch.vocab_size
            for token_id in token_ids:
                if isinstance(token_id, bool) or not isinstance(token_id, int) or not 0 <= token_id < vocab_size:
                    raise InvalidRequestError(f"prompt token id {token_id!r} is not an integer in [0, {vocab_size})")
        else:
            raise InvalidRequestError(f"prompt must be a string or a list of token ids, got {type(prompt).__name__}")
        if not token_ids:
            raise InvalidRequestError("prompt is empty (no tokens after tokenisation)")
        if len(token_ids) >= self.max_model_len:
            raise InvalidRequestError(
                f"prompt has {len(token_ids)} tokens but max_model_len is {self.max_model_len} "
                f"(prompt plus at least one generated token must fit)")
        return token_ids

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                    arrival_time: float | None = None, oracle_output_len: int | None = None) -> list[int]:
        """Validate and queue a request; returns its prompt token ids. Raises InvalidRequestError."""
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError(f"sampling params must be SamplingParams, got {type(params).__name__}")
        if request_id in self._children:
            raise InvalidRequestError(f"request id {request_id!r} is already running")
        if oracle_output_len is not None and (isinstance(oracle_output_len, bool)
                                              or not isinstance(oracle_output_len, int) or oracle_output_len < 0):
            raise InvalidRequestError(f"oracle_output_len must be a non-negative integer, got {oracle_output_len!r}")
        prompt_token_ids = self.tokenize_prompt(prompt)
        arrival_time = self.scheduler.clock() if arrival_time is None else arrival_time
        child_ids = []
        for index in range(params.n):
            child_id = request_id if params.n == 1 else f"{request_id}#{index}"
            child_params = params
            if params.n > 1:
                child_params = params.clone(n=1, seed=None if params.seed is None else params.seed + index)
            request = Request(
                request_id=child_id,
                prompt_token_ids=list(prompt_token_ids),
                sampling_params=child_params,
                eos_token_ids=self.eos_token_ids,
                max_model_len=self.max_model_len,
                oracle_output_len=oracle_output_len,  # benchmark-only oracle (sjf-oracle policy)
                arrival_time=arrival_time,
                prompt=prompt if isinstance(prompt, str) else None,
            )
            detokenizer = IncrementalDetokenizer(self.tokenizer, request.prompt_token_ids, child_params)
            self._sequences[child_id] = _Sequence(request, request_id, index, detokenizer)
            self.scheduler.add_request(request)
            child_ids.append(child_id)
        self._children[request_id] = child_ids
        self.stats.num_prompt_tokens += len(prompt_token_ids)
        return prompt_token_ids

    def abort_request(self, request_id: str) -> None:
        """Abort a request (all its samples) and free its KV blocks now. Unknown ids are ignored."""
        child_ids = self._children.pop(request_id, None)
        if not child_ids:
            return
        self.scheduler.abort_requests(child_ids)
        for child_id in child_ids:
            self._sequences.pop(child_id, None)
        self.stats.num_aborted_requests += 1

    def has_unfinished_requests(self) -> bool:
        return bool(self._sequences)

    def snapshot(self) -> EngineSnapshot:
        """Queue depth, seats, KV blocks and preemptions now (call from the thread that steps)."""
        scheduler = self.scheduler
        return EngineSnapshot(
            num_waiting=scheduler.num_waiting,
            num_running=scheduler.num_running,
            num_used_blocks=scheduler.num_used_blocks,
            num_free_blocks=scheduler.num_free_blocks,
            num_blocks=self.num_blocks,
            num_preemptions=scheduler.num_preemptions,
            num_steps=self.stats.num_steps,
            num_unfinished_sequences=len(self._sequences),
        )

    def num_sequences(self, request_id: str) -> int:
        return len(self._children.get(request_id, ()))

    # ---- the step -------------------------------------------------------------------------------

    def step(self) -> list[CompletionDelta]:
        scheduler_output = self.scheduler.schedule()
        runner_output = self.runner.execute(scheduler_output)
        updated = self.scheduler.update(scheduler_output, runner_output)
        self.spec.after_step(scheduler_output, self.scheduler.running)
        self.stats.num_steps += 1
        deltas = []
        for request in updated:
            sequence = self._sequences.get(request.request_id)
            if sequence is None:
                continue
            deltas.append(self._make_delta(sequence, runner_output.logprobs.get(request.request_id)))
        return deltas

    def _make_delta(self, sequence: _Sequence, raw_logprobs) -> CompletionDelta:
        request = sequence.request
        new_token_ids = request.output_token_ids[sequence.num_emitted_tokens:]
        sequence.num_emitted_tokens = request.num_output_tokens
        self.stats.num_generated_tokens += len(new_token_ids)
        detokenizer = sequence.detokenizer
        text = detokenizer.update(new_token_ids)
        if detokenizer.stop_matched is not None:
            if not request.is_finished or request.status == RequestStatus.FINISHED_LENGTH:
                if not request.is_finished:
                    self.scheduler.finish_requests([request.request_id], RequestStatus.FINISHED_STOPPED)
                request.status = RequestStatus.FINISHED_STOPPED
                request.stop_reason = detokenizer.stop_matched
        elif request.is_finished:
            text += detokenizer.finish()

        logprobs = None
        if request.sampling_params.logprobs is not None and raw_logprobs is not None:
            logprobs = self._convert_logprobs(new_token_ids, raw_logprobs[: len(new_token_ids)])

        finish_reason = request.status.finish_reason if request.is_finished else None
        if finish_reason is not None:
            self._drop_sequence(sequence)
        return CompletionDelta(
            request_id=sequence.parent_id,
            index=sequence.index,
            text=text,
            token_ids=new_token_ids,
            logprobs=logprobs,
            finish_reason=finish_reason,
            stop_reason=request.stop_reason,
            metrics=replace(self.metrics_of(request), spec=self.spec.stats_of(request.request_id)),
        )

    def _convert_logprobs(self, token_ids: list[int], raw) -> list[TokenLogprobs]:
        converted = []
        for token_id, (logprob, rank, top) in zip(token_ids, raw):
            entry: TokenLogprobs = {}
            for rank_in_top, (top_id, top_logprob) in enumerate(top, start=1):
                entry[top_id] = Logprob(top_logprob, rank_in_top, self.tokenizer.decode([top_id], skip_special_tokens=False))
            entry[token_id] = Logprob(logprob, rank, self.tokenizer.decode([token_id], skip_special_tokens=False))
            converted.append(entry)
        return converted

    def _drop_sequence(self, sequence: _Sequence) -> None:
        self._sequences.pop(sequence.request.request_id, None)
        siblings = self._children.get(sequence.parent_id)
        if siblings is not None and all(child not in self._sequences for child in siblings):
            del self._children[sequence.parent_id]
            self.stats.num_finished_requests += 1

    @staticmethod
    def metrics_of(request: Request) -> RequestMetrics:
        return RequestMetrics(
            arrival_time=request.arrival_time,
            first_scheduled_time=request.first_scheduled_time,
            first_token_time=request.first_token_time,
            finished_time=request.finished_time,
            num_prompt_tokens=request.num_prompt_tokens,
            num_output_tokens=request.num_output_tokens,
            num_cached_tokens=max(request.num_cached_tokens, 0),
            num_preemptions=request.num_preemptions,
        )
