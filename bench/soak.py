"""Soak: many hot swaps through the real vLLM engine, resident memory of every process sampled.

Each swap is what a rollout replica does per version: new weights (the model perturbed
a little, so every version differs) written as safetensors, ``VLLMEngine.load_weights``,
the probe recomputed by the engine and checked against the same weights under
transformers, and one short generation (so the prefix cache and the scheduler run too).
RSS of this process and of every child (vLLM's engine core) is sampled every
``--sample-every`` swaps; the result is each process's growth after the warm-up.

    .venv/bin/python bench/soak.py [--swaps 1000] [--warmup 100] [--trim] [--json]

``--trim`` asks the worker to return freed heap to the OS (``malloc_trim``) after every
swap — the comparison that tells allocator retention from a real leak.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
import torch
from transformers import AutoModelForCausalLM

from asympo.config import Settings
from asympo.engines import GenerationRequest
from asympo.model.loading import resolve_model_path
from asympo.rl.probe import probe_logprobs, probe_tokens
from asympo.transport.weights_client import write_shards


def rss_by_process() -> dict[str, float]:
    """MB resident of this process and each descendant, keyed ``name:pid``."""
    me = psutil.Process()
    out: dict[str, float] = {}
    for proc in [me, *me.children(recursive=True)]:
        try:
            out[f"{proc.name()}:{proc.pid}"] = proc.memory_info().rss / 1e6
        except psutil.Error:
            continue
    return out


def main() -> None:
    """Run the soak and print each process's resident memory growth."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--swaps", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=100, help="swaps before the baseline")
    parser.add_argument("--sample-every", type=int, default=25)
    parser.add_argument("--trim", action="store_true", help="malloc_trim in the worker per swap")
    parser.add_argument("--model", default="", help="model directory (default: the tiny model)")
    parser.add_argument("--json", action="store_true", help="print only the JSON result")
    args = parser.parse_args()

    from asympo.engines.vllm_engine import VLLMEngine

    model_dir = args.model or resolve_model_path(Settings())
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokens = probe_tokens(int(hf.config.vocab_size))
    engine = VLLMEngine(str(model_dir), dtype="float32", max_model_len=256, kv_cache_gib=1.0)
    work = Path(tempfile.mkdtemp(prefix="asympo-soak-"))
    gen = torch.Generator().manual_seed(0)
    samples: list[dict[str, Any]] = []
    worst_probe = 0.0
    swap_s: list[float] = []
    start = time.monotonic()
    try:
        for i in range(1, args.swaps + 1):
            with torch.no_grad():
                for p in hf.parameters():
                    p.add_(torch.randn(p.shape, generator=gen) * 1e-3)
            directory = work / f"v{i % 2}"
            shutil.rmtree(directory, ignore_errors=True)
            directory.mkdir()
            write_shards(hf.state_dict(), directory)
            t = time.perf_counter()
            engine.load_weights(directory)
            got = engine.probe_logprobs(tokens)
            swap_s.append(time.perf_counter() - t)
            want = probe_logprobs(hf, tokens)
            worst_probe = max(worst_probe, max(abs(a - b) for a, b in zip(got, want, strict=True)))
            engine.generate([GenerationRequest(prompt_tokens=tokens[:8], n=1, max_tokens=8)])
            if args.trim:
                engine._run(engine._llm.collective_rpc("asympo_trim_memory"))
            if i % args.sample_every == 0 or i == args.warmup:
                samples.append({"swap": i, "rss_mb": rss_by_process()})
    finally:
        engine.close()
        shutil.rmtree(work, ignore_errors=True)

    base = next(s for s in samples if s["swap"] >= args.warmup)
    last = samples[-1]
    growth = {}
    for name, mb in last["rss_mb"].items():
        if name in base["rss_mb"]:
            before = base["rss_mb"][name]
            growth[name] = {
                "rss_after_warmup_mb": round(before, 1),
                "rss_end_mb": round(mb, 1),
                "growth_pct": round(100 * (mb - before) / before, 2),
                "mb_per_swap": round((mb - before) / max(last["swap"] - base["swap"], 1), 4),
            }
    swap_s.sort()
    result = {
        "swaps": args.swaps,
        "warmup": args.warmup,
        "trim": args.trim,
        "seconds": round(time.monotonic() - start, 1),
        "swap_median_s": round(swap_s[len(swap_s) // 2], 4),
        "worst_probe_abs_diff": worst_probe,
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "processes": growth,
        "samples": samples,
    }
    if args.json:
        print(json.dumps(result))
        return
    print(
        f"{args.swaps} swaps in {result['seconds']} s (median swap+probe "
        f"{result['swap_median_s']} s; worst probe |diff| {worst_probe:.2e}; "
        f"trim={args.trim}; load {result['load_avg_1m']})"
    )
    for name, g in growth.items():
        print(
            f"{name:32s} {g['rss_after_warmup_mb']:8.1f} MB after warm-up -> "
            f"{g['rss_end_mb']:8.1f} MB ({g['growth_pct']:+.2f} %, {g['mb_per_swap']:+.4f} MB/swap)"
        )
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}))


if __name__ == "__main__":
    main()
