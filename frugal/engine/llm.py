"""LLM: the in-process, synchronous API in vLLM's shape.

    llm = LLM(model="DIR or hub id", dtype="auto", device="cpu", kv_cache_memory="2GiB")
    outputs = llm.generate(["Hello"], SamplingParams(max_tokens=32))
    for delta in llm.stream("Hello", params): ...
    llm.chat([{"role": "user", "content": "Hi"}], params)

All requests of one `generate` call are batched together by the continuous-batching scheduler.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator, Sequence

from tqdm.auto import tqdm

from frugal.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig, SpecConfig, parse_memory
from frugal.engine.engine_core import EngineCore
from frugal.errors import InvalidRequestError
from frugal.outputs import CompletionDelta, CompletionOutput, RequestOutput
from frugal.quant.config import QuantConfig
from frugal.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

Prompt = str | list[int]


class LLM:
    def __init__(
        self,
        model: str,
        dtype: str = "auto",
        device: str = "cpu",
        kv_cache_memory: str | int = "2GiB",
        max_model_len: int | None = None,
        block_size: int = 16,
        enable_prefix_caching: bool = True,
        max_num_seqs: int = 64,
        max_num_batched_tokens: int = 2048,
        enable_chunked_prefill: bool = True,
        scheduling_policy: str = "fcfs",
        policy_options: dict | None = None,
        swap_space: str | int = 0,
        swap_path: str | None = None,
        attention_backend: str = "auto",
        seed: int = 0,
        revision: str | None = None,
        quantization: str | QuantConfig | None = None,
        speculative: str | SpecConfig | None = None,
        compile: bool = False,
        quant_activations: str = "int8",
        native_decode: bool = True,
    ):
        """`quantization`: None, 'int4' (group 32, symmetric, INT8 embedding and LM head), 'int8' or a
        `QuantConfig` — a 16-bit checkpoint is quantized while it loads; a `frugal quantize` checkpoint
        loads with its own settings whatever this says (a conflicting request is a ConfigError).
        `speculative`: None, 'ngram:n=3,k=5' (prompt lookup), 'draft:DIR,k=5' (a draft model) or a
        `SpecConfig` - lossless speculative decoding (frugal.spec); per-request stats arrive in
        `RequestOutput.metrics.spec`.
        `compile`: run CPU decode steps through torch.compile (Inductor, C++ wrapper): less Python per
        token, same output; the first decode step compiles (about a minute; cached on disk).
        `native_decode`: run CPU decode steps of Llama-family models as one C++ call (the same kernels on
        the same values as eager, so the same output; on by default, `compile` takes precedence).
        `quant_activations`: 'int8' (default) rounds activations to INT8 per 32-block for the INT4/INT8
        VNNI kernels, as llama.cpp's Q4_0/Q8_0 do; 'exact' keeps them in the model dtype (slower)."""
        config = EngineConfig(
            quant=QuantConfig.create(quantization),
            speculative=SpecConfig.parse(speculative),
            model=ModelConfig(model=str(model), dtype=dtype, device=device, revision=revision,
                              max_model_len=max_model_len, seed=seed, attention_backend=attention_backend,
                              compile=compile, quant_activations=quant_activations,
                              native_decode=native_decode),
            cache=CacheConfig(block_size=block_size, kv_cache_memory_bytes=parse_memory(kv_cache_memory),
                              enable_prefix_caching=enable_prefix_caching,
                              swap_space_bytes=parse_memory(swap_space) if swap_space else 0, swap_path=swap_path),
            scheduler=SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                                      enable_chunked_prefill=enable_chunked_prefill, policy=scheduling_policy,
                                      policy_options=dict(policy_options or {}),
                                      max_model_len=max_model_len or SchedulerConfig.max_model_len),
        )
        self.engine = EngineCore(config)
        self._request_counter = itertools.count()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """SamplingParams with the checkpoint's generation_config.json defaults applied."""
        return SamplingParams(**self.engine.generation_defaults.sampling_defaults)

    # ---- batch generation -----------------------------------------------------------------------

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Generate for every prompt (strings or token-id lists); one RequestOutput per prompt, in order.

        Every prompt is validated before any is queued, so a bad one raises InvalidRequestError and
        leaves the engine untouched."""
        prompt_list = self._as_prompt_list(prompts)
        params_list = self._as_params_list(sampling_params, len(prompt_list))
        for prompt in prompt_list:
            self.engine.tokenize_prompt(prompt)
        request_ids = [self._add(prompt, params) for prompt, params in zip(prompt_list, params_list)]
        results = {rid: self._new_output(rid, prompt, params)
                   for rid, prompt, params in zip(request_ids, prompt_list, params_list)}
        pending = set(request_ids)
        progress = tqdm(total=len(request_ids), desc="generating", unit="req", disable=not use_tqdm)
        try:
            while pending:
                for delta in self.engine.step():
                    output = results.get(delta.request_id)
                    if output is None:
                        continue
                    self._apply_delta(output, delta)
                    if output.finished and delta.request_id in pending:
                        pending.discard(delta.request_id)
                        progress.update(1)
        except BaseException:
            for rid in pending:
                self.engine.abort_request(rid)
            raise
        finally:
            progress.close()
        return [results[rid] for rid in request_ids]

    def stream(self, prompt: Prompt, sampling_params: SamplingParams | None = None) -> Iterator[CompletionDelta]:
        """Yield CompletionDeltas for one prompt as tokens are produced; aborts the request if the
        consumer stops early."""
        params = sampling_params or self.get_default_sampling_params()
        request_id = self._add(prompt, params)
        num_unfinished = params.n
        try:
            while num_unfinished:
                for delta in self.engine.step():
                    if delta.request_id != request_id:
                        continue
                    if delta.finished:
                        num_unfinished -= 1
                    yield delta
        finally:
            if num_unfinished:
                self.engine.abort_request(request_id)

    def chat(
        self,
        messages: list[dict] | list[list[dict]],
        sampling_params: SamplingParams | None = None,
        add_generation_prompt: bool = True,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Apply the checkpoint's chat template to one conversation (or a list) and generate."""
        conversations = messages if messages and isinstance(messages[0], list) else [messages]
        prompts = [self.apply_chat_template(conv, add_generation_prompt) for conv in conversations]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        text = self.engine.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        # The template writes any BOS itself.
        return self.engine.tokenizer.encode(text, add_special_tokens=False)

    # ---- helpers --------------------------------------------------------------------------------

    def _add(self, prompt: Prompt, params: SamplingParams) -> str:
        request_id = str(next(self._request_counter))
        self.engine.add_request(request_id, prompt, params)
        return request_id

    @staticmethod
    def _as_prompt_list(prompts) -> list[Prompt]:
        if isinstance(prompts, str):
            return [prompts]
        if isinstance(prompts, (list, tuple)) and prompts and all(isinstance(p, int) for p in prompts):
            return [list(prompts)]
        if isinstance(prompts, (list, tuple)):
            return list(prompts)
        raise InvalidRequestError(f"prompts must be a string, a token-id list or a list of those, got {type(prompts).__name__}")

    def _as_params_list(self, params, count: int) -> list[SamplingParams]:
        if params is None:
            return [self.get_default_sampling_params()] * count
        if isinstance(params, SamplingParams):
            return [params] * count
        params = list(params)
        if len(params) != count:
            raise InvalidRequestError(f"got {len(params)} sampling params for {count} prompts")
        return params

    def _new_output(self, request_id: str, prompt: Prompt, params: SamplingParams) -> RequestOutput:
        prompt_token_ids = self.engine.tokenize_prompt(prompt)
        outputs = [CompletionOutput(index=i, text="", token_ids=[],
                                    cumulative_logprob=0.0 if params.logprobs is not None else None,
                                    logprobs=[] if params.logprobs is not None else None)
                   for i in range(params.n)]
        return RequestOutput(request_id=request_id, prompt=prompt if isinstance(prompt, str) else None,
                             prompt_token_ids=prompt_token_ids, outputs=outputs, finished=False,
                             metrics=None)  # type: ignore[arg-type]

    @staticmethod
    def _apply_delta(output: RequestOutput, delta: CompletionDelta) -> None:
        completion = output.outputs[delta.index]
        completion.text += delta.text
        completion.token_ids.extend(delta.token_ids)
        if delta.logprobs is not None and completion.logprobs is not None:
            completion.logprobs.extend(delta.logprobs)
            for token_id, entry in zip(delta.token_ids, delta.logprobs):
                completion.cumulative_logprob += entry[token_id].logprob
        if delta.finish_reason is not None:
            completion.finish_reason = delta.finish_reason
            completion.stop_reason = delta.stop_reason
        if delta.metrics is not None and delta.index == 0:
            output.metrics = delta.metrics
            output.num_cached_tokens = delta.metrics.num_cached_tokens
        output.finished = all(c.finish_reason is not None for c in output.outputs)
