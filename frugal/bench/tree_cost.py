"""What a target pass verifying a token tree of n nodes costs, against a chain of n and a plain decode
step (to size trees): `python -m frugal.bench.tree_cost MODEL --n 1 2 4 8 16 --context 128`.

One request with a `context`-token KV cache already written; then, best of `repeats` (interleaved
rounds), the time of: one plain decode step (1 row); a chain pass (1 + n rows, causal); a tree pass
(1 + n rows, positions by depth, ancestor mask; a breadth-first binary tree, node i's parent
(i - 1) // 2); the tree's K/V compaction for a depth-log2(n) accepted path (every layer, one gather
and scatter); and the greedy `verify_tree` call on the tree's logits. Each pass includes building
the model input and the LM head over the verified rows, as in the engine.
"""

from __future__ import annotations

import argparse
import json
import time


def binary_tree_parents(n: int) -> list[int]:
    """Parent ids of a breadth-first binary tree of n nodes under the root."""
    return [(i - 1) // 2 for i in range(1, n + 1)]


def rightmost_path(n: int) -> list[int]:
    """The rightmost root-to-leaf path of `binary_tree_parents(n)`: nodes 2, 6, 14, ... (<= n)."""
    path, node = [], 2
    while node <= n:
        path.append(node)
        node = 2 * node + 2
    return path


def run(model: str, ns: list[int], context: int, repeats: int, threads: int, dtype: str) -> dict:
    import torch

    from frugal import LLM
    from frugal.core.scheduler_output import ScheduledRequest, SchedulerOutput
    from frugal.request import Request
    from frugal.runner.input_builder import build_model_input
    from frugal.sampling_params import SamplingParams
    from frugal.spec.verify import verify_tree

    torch.set_num_threads(threads)
    max_n = max(ns)
    llm = LLM(model, dtype=dtype, kv_cache_memory="256MiB", max_num_seqs=1, max_model_len=context + max_n + 16)
    engine = llm.engine
    runner = engine.runner
    block_size = engine.config.cache.block_size
    num_positions = context + max_n + 1
    block_ids = list(range(-(-num_positions // block_size)))  # a private table: nothing else runs
    request = Request("cost", [1] * context, SamplingParams())
    token_ids = [(7 * i) % engine.arch.vocab_size for i in range(num_positions)]

    def timed(action) -> float:
        begin = time.perf_counter()
        with torch.inference_mode():
            action()
        if runner.device.type == "cuda":
            torch.cuda.synchronize(runner.device)
        return time.perf_counter() - begin

    def forward(start: int, num_tokens: int, num_spec: int = 0, parents: list[int] | None = None):
        new_ids = token_ids[start:start + num_tokens]
        scheduled = ScheduledRequest(request=request, start_pos=start, num_new_tokens=num_tokens, token_ids=new_ids,
                                     block_ids=block_ids, spec_token_ids=new_ids[num_tokens - num_spec:],
                                     spec_parent_ids=parents)
        model_input = build_model_input(SchedulerOutput([scheduled], num_tokens), block_size, runner.device)
        return runner.forward_logits(model_input)

    timed(lambda: forward(0, context))  # write the context's KV (and warm up)
    seconds: dict[str, float] = {}

    def best(key: str, value: float) -> None:
        seconds[key] = min(seconds.get(key, float("inf")), value)

    logits_of: dict[int, torch.Tensor] = {}
    for _ in range(repeats):  # interleaved rounds: load drift hits every variant alike
        best("plain", timed(lambda: forward(context, 1)))
        for n in ns:
            parents = binary_tree_parents(n)
            best(f"chain_{n}", timed(lambda: forward(context, 1 + n, n)))
            best(f"tree_{n}", timed(lambda: logits_of.__setitem__(n, forward(context, 1 + n, n, parents))))
            path = rightmost_path(n)  # accepted nodes a_j != j: every one moves
            moves = [(context + node, context + j) for j, node in enumerate(path, start=1) if node != j]
            if moves:
                slot_moves = [(runner._slot(block_ids, s), runner._slot(block_ids, d)) for s, d in moves]
                best(f"compact_{n}", timed(lambda: runner._compact_tree_kv(slot_moves)))
            best(f"verify_{n}", timed(lambda: verify_tree(logits_of[n], token_ids[context + 1:context + 1 + n],
                                                          parents, greedy=True)))
    plain = seconds["plain"]
    rows = []
    for n in ns:
        row = {"n": n, "chain_ms": seconds[f"chain_{n}"] * 1e3, "tree_ms": seconds[f"tree_{n}"] * 1e3,
               "chain_vs_plain": seconds[f"chain_{n}"] / plain, "tree_vs_plain": seconds[f"tree_{n}"] / plain,
               "tree_vs_chain": seconds[f"tree_{n}"] / seconds[f"chain_{n}"],
               "compact_ms": seconds.get(f"compact_{n}", 0.0) * 1e3, "verify_greedy_ms": seconds[f"verify_{n}"] * 1e3}
        rows.append(row)
    backend = runner.model.model.layers[0].self_attn.attn.backend
    return {"model": model, "context": context, "repeats": repeats, "threads": threads, "dtype": str(engine.dtype),
            "device": str(runner.device), "attention_backend": type(backend).__name__, "plain_ms": plain * 1e3,
            "rows": rows}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--n", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args(argv)
    results = run(args.model, args.n, args.context, args.repeats, args.threads, args.dtype)
    print(json.dumps(results, indent=1))
    print(f"plain decode step: {results['plain_ms']:.2f} ms")
    print(f"{'n':>4} {'chain ms':>9} {'tree ms':>9} {'chain/plain':>12} {'tree/plain':>11} {'tree/chain':>11} "
          f"{'compact ms':>11} {'verify ms':>10}")
    for r in results["rows"]:
        print(f"{r['n']:>4} {r['chain_ms']:>9.2f} {r['tree_ms']:>9.2f} {r['chain_vs_plain']:>12.2f} "
              f"{r['tree_vs_plain']:>11.2f} {r['tree_vs_chain']:>11.2f} {r['compact_ms']:>11.3f} "
              f"{r['verify_greedy_ms']:>10.3f}")


if __name__ == "__main__":
    main()
