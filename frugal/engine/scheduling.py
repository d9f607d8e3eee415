"""Build the engine's scheduling side: policy, swap tier and scheduler, with the numbers they need
measured on this machine (the prefill profile for skip-join MLFQ and the swap cost model, and the
copy bandwidth between the KV pool and the slow tier).

`measure_prefill_profile` times single-prompt prefill iterations through the real ModelRunner
before any request exists (it writes KV blocks nobody owns yet). `frugal bench profile-prefill`
stores the same measurement as JSON, which `policy_options={"prefill_profile": PATH}` reuses.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch

from frugal.config import CacheConfig, SchedulerConfig
from frugal.core.policy import make_policy, policy_class, policy_option_names
from frugal.core.prefill_profile import PrefillProfile
from frugal.core.scheduler import Scheduler
from frugal.core.scheduler_output import ScheduledRequest, SchedulerOutput
from frugal.core.swap import SwapCostModel
from frugal.request import Request
from frugal.runner.input_builder import build_model_input
from frugal.runner.model_runner import ModelRunner
from frugal.runner.swap import KVSwapper
from frugal.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


def profile_lengths(max_tokens: int) -> list[int]:
    """Prompt lengths to time: powers of two and their 1.5x, up to `max_tokens` (included)."""
    lengths = {max_tokens}
    length = 1
    while length < max_tokens:
        lengths.add(length)
        if length >= 2 and length * 3 // 2 < max_tokens:
            lengths.add(length * 3 // 2)
        length *= 2
    return sorted(lengths)


def measure_prefill_profile(runner: ModelRunner, num_blocks: int, max_model_len: int, vocab_size: int,
                            repeats: int = 3, lengths: list[int] | None = None, metadata: dict | None = None,
                            timer: Callable[[], float] = time.perf_counter) -> PrefillProfile:
    """Median seconds of one iteration prefilling an N-token prompt alone, for N in `lengths`
    (default: `profile_lengths` up to what one request can hold), timed by `timer` (wall time, or
    `time.process_time` on a CPU shared with other work). Only while no request owns a block."""
    block_size = runner.block_size
    max_tokens = min(max_model_len - 1, num_blocks * block_size)
    lengths = lengths or profile_lengths(max_tokens)
    generator = torch.Generator().manual_seed(0)
    params = SamplingParams(temperature=0.0, max_tokens=1)

    def prefill_once(num_tokens: int) -> float:
        token_ids = torch.randint(0, vocab_size, (num_tokens,), generator=generator).tolist()
        request = Request("__prefill_profile__", token_ids, params, max_model_len=max_model_len)
        block_ids = list(range(-(-num_tokens // block_size)))
        scheduled = ScheduledRequest(request=request, start_pos=0, num_new_tokens=num_tokens, token_ids=token_ids,
                                     block_ids=block_ids)
        output = SchedulerOutput(scheduled=[scheduled], num_scheduled_tokens=num_tokens)
        start = timer()
        runner.execute(output)
        if runner.device.type == "cuda":
            torch.cuda.synchronize(runner.device)
        return timer() - start

    prefill_once(min(lengths[-1], 64))  # warm-up
    samples = [(n, prefill_once(n)) for _ in range(repeats) for n in lengths]
    profile = PrefillProfile.from_samples(samples, {"repeats": repeats, **(metadata or {})})
    logger.info("prefill profile: %s", ", ".join(f"{n}:{t * 1e3:.2f}ms" for n, t in profile.points))
    return profile


def make_swapper(cache_config: CacheConfig, kv_caches: list[torch.Tensor], bytes_per_block: int) -> KVSwapper:
    """The slow tier sized by `swap_space_bytes` (0 blocks: swapping disabled)."""
    num_swap_blocks = cache_config.swap_space_bytes // bytes_per_block
    if cache_config.swap_space_bytes and not num_swap_blocks:
        logger.warning("swap space of %d bytes is smaller than one KV block (%d bytes): swapping disabled",
                       cache_config.swap_space_bytes, bytes_per_block)
    return KVSwapper(kv_caches, num_swap_blocks, path=cache_config.swap_path)


def build_scheduler(scheduler_config: SchedulerConfig, cache_config: CacheConfig, num_blocks: int,
                    runner: ModelRunner, swapper: KVSwapper, vocab_size: int, max_model_len: int,
                    clock: Callable[[], float] = time.monotonic, metadata: dict | None = None) -> Scheduler:
    """The policy (with a prefill profile loaded or measured when it, or the swap cost model, needs
    one), the swap cost model (with the measured copy bandwidth) and the Scheduler."""
    options = dict(scheduler_config.policy_options)
    cls = policy_class(scheduler_config.policy)
    profile = options.get("prefill_profile")
    if isinstance(profile, str):
        profile = PrefillProfile.load(profile)
    needs_profile = cls.needs_prefill_profile(options) or swapper.num_slow_blocks > 0
    if profile is None and needs_profile:
        logger.info("measuring the prefill profile (pass policy option prefill_profile=PATH to reuse one)")
        profile = measure_prefill_profile(runner, num_blocks, max_model_len, vocab_size, metadata=metadata)
    if profile is not None and "prefill_profile" in policy_option_names(scheduler_config.policy):
        options["prefill_profile"] = profile
    policy = make_policy(scheduler_config.policy, **options)

    cost_model = None
    if swapper.num_slow_blocks:
        bandwidth = swapper.measure_bandwidth()
        cost_model = SwapCostModel(swapper.bytes_per_block, bandwidth, profile)
        logger.info("KV swap: %d slow blocks, %.2f GB/s measured round trip", swapper.num_slow_blocks, bandwidth / 1e9)
    return Scheduler(scheduler_config, runner.block_size, num_blocks, cache_config.enable_prefix_caching, policy,
                     num_swap_blocks=swapper.num_slow_blocks, swap_cost_model=cost_model, clock=clock)


def measure_swap_overlap(runner: ModelRunner, swapper: KVSwapper, num_blocks: int, num_tokens: int,
                         vocab_size: int, max_model_len: int, repeats: int = 5) -> dict:
    """Wall seconds (medians of `repeats`) of: copying `num_blocks` blocks in from the slow tier, one
    prefill step of `num_tokens` tokens, the two one after the other, and the copy started (on the
    swapper's worker thread or CUDA stream) before the step and joined after it. Whether overlap
    helps is `overlapped_s < sequential_s`. Only while no request owns a block."""
    num_blocks = min(num_blocks, swapper.num_slow_blocks, runner.kv_caches[0].shape[1] // 2)
    step_blocks = list(range(num_blocks, num_blocks + -(-num_tokens // runner.block_size)))
    pairs = [(block, block) for block in range(num_blocks)]
    token_ids = torch.randint(0, vocab_size, (num_tokens,), generator=torch.Generator().manual_seed(0)).tolist()
    request = Request("__swap_overlap__", token_ids, SamplingParams(temperature=0.0, max_tokens=1),
                      max_model_len=max_model_len)
    output = SchedulerOutput(scheduled=[ScheduledRequest(request, 0, num_tokens, token_ids, step_blocks)],
                             num_scheduled_tokens=num_tokens)

    def timed(action) -> float:
        start = time.perf_counter()
        action()
        if runner.device.type == "cuda":
            torch.cuda.synchronize(runner.device)
        return time.perf_counter() - start

    def copy() -> None:
        swapper.start_copy_in(pairs)
        swapper.wait()

    def overlapped() -> None:
        swapper.start_copy_in(pairs)
        runner.forward_logits(build_model_input(output, runner.block_size, runner.device))
        swapper.wait()

    def step() -> None:
        runner.forward_logits(build_model_input(output, runner.block_size, runner.device))

    step()  # warm-up
    samples: dict[str, list[float]] = {"copy_s": [], "step_s": [], "overlapped_s": []}
    with torch.inference_mode():
        for _ in range(repeats):
            samples["copy_s"].append(timed(copy))
            samples["step_s"].append(timed(step))
            samples["overlapped_s"].append(timed(overlapped))
    swapper.num_blocks_in -= 2 * num_blocks * repeats
    result = {name: sorted(values)[len(values) // 2] for name, values in samples.items()}
    result["sequential_s"] = result["copy_s"] + result["step_s"]
    result.update({"num_blocks": num_blocks, "num_tokens": num_tokens, "repeats": repeats,
                   "overlap": "cuda stream" if runner.device.type == "cuda" else
                   ("thread" if swapper.overlap else "none")})
    return result
