"""GPU acceptance check: one command, no network, a few minutes on one NVIDIA GPU.

    python scripts/gpu_check.py [--json] [--steps 3] [--sizes qwen3-0.6b,qwen3-1.7b]

1. Builds random-initialised Qwen3 models (~0.6B and ~1.7B parameters) locally.
2. Per model: learner steps under FSDP2 (bf16 compute, float32 master weights) with
   activation checkpointing and token-budget micro-batches, on this process's GPU
   (a one-process NCCL group); reports tokens/s, peak memory and MFU against the GPU's
   dense bf16 peak (``asympo.model.sizing.BF16_PEAK_FLOPS``).
3. Generation with the transformers engine on CUDA and, if vLLM is installed, with vLLM
   (CUDA graphs on); one hot swap of the trained weights into vLLM, checked with the
   probe computed on the sharded learner model.

Without CUDA it exits with status 2 and a one-line message. Figures go to
docs/benchmarks.md by hand (with the GPU's name).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from asympo.model.sizing import ARCHS, build_random_model, mfu, peak_flops_for  # noqa: E402

PROMPT_LEN, COMPLETION_LEN = 128, 384
GROUPS, SAMPLES = 8, 8
TOKEN_BUDGET = 16384


def synthetic_groups(vocab: int, seed: int) -> list[Any]:
    """GROUPS groups of SAMPLES random completions with mixed rewards (all tokens random)."""
    from asympo.rl.training import TrainGroup

    gen = torch.Generator().manual_seed(seed)

    def toks(n: int) -> list[int]:
        return [int(t) for t in torch.randint(1, vocab, (n,), generator=gen)]

    groups = []
    for g in range(GROUPS):
        lengths = [COMPLETION_LEN // (1 + (i % 4)) for i in range(SAMPLES)]  # long and short
        groups.append(
            TrainGroup(
                f"g{g}",
                toks(PROMPT_LEN),
                [toks(n) for n in lengths],
                [float(i % 2) for i in range(SAMPLES)],
                [0] * SAMPLES,
            )
        )
    return groups


def _init_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(port))
    dist.init_process_group("nccl", rank=0, world_size=1)


def learner_check(key: str, steps: int) -> dict[str, Any]:
    """FSDP bf16 + activation checkpointing steps on a random ``key`` model."""
    from asympo.rl.training import StepConfig, train_step
    from services.learner.distributed import DistInfo
    from services.learner.sharding import wrap_model

    arch = ARCHS[key]
    device = torch.device("cuda", 0)
    model = build_random_model(arch).to(device)
    model = wrap_model(model, DistInfo(0, 1, device), "fsdp", "bf16", False, True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    cfg = StepConfig(micro_batch=64, max_tokens_per_micro_batch=TOKEN_BUDGET)
    torch.cuda.reset_peak_memory_stats()
    times, tokens = [], 0
    for step in range(steps + 1):  # the first step warms up (allocator, kernels)
        groups = synthetic_groups(arch.vocab, step)
        torch.cuda.synchronize()
        start = time.perf_counter()
        train_step(model, opt, groups, cfg)
        torch.cuda.synchronize()
        if step > 0:
            times.append(time.perf_counter() - start)
            tokens += sum(PROMPT_LEN + len(c) for g in groups for c in g.completions)
    rate = tokens / sum(times)
    peak = peak_flops_for(torch.cuda.get_device_name(0))
    flops = arch.flops_per_token(PROMPT_LEN + COMPLETION_LEN)
    return {
        "model": arch.name,
        "params_b": round(arch.params() / 1e9, 3),
        "tokens_per_s": round(rate, 1),
        "step_s": round(sum(times) / len(times), 3),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "mfu": round(mfu(rate, flops, peak), 4) if peak else None,
    }


def generation_check(key: str) -> dict[str, Any]:
    """HF engine on CUDA, then vLLM (if installed) with one hot swap checked by the probe.

    The models here have ``key``'s shape but the character tokenizer's vocabulary, so
    every generated id decodes. The "learner" is a second model, FSDP-sharded: its probe
    comes from the sharded model, its full weights are gathered and swapped into vLLM.
    """
    from asympo.engines.base import GenerationRequest
    from asympo.engines.hf_engine import HFEngine
    from asympo.model.char_tokenizer import char_vocab, save_char_tokenizer
    from asympo.rl.probe import make_probe, probe_tokens
    from services.learner.distributed import DistInfo
    from services.learner.sharding import full_state_dict, wrap_model

    arch = dataclasses.replace(ARCHS[key], vocab=len(char_vocab()))
    device = torch.device("cuda", 0)
    learner = wrap_model(
        build_random_model(arch, seed=2).to(device), DistInfo(0, 1, device), "fsdp", "bf16"
    )
    probe = make_probe(learner, probe_tokens(arch.vocab), 0.05)  # bf16 vs bf16 kernels
    weights = full_state_dict(learner)
    del learner
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        base = build_random_model(arch, seed=1)  # other weights: the swap must change them
        base.save_pretrained(tmp)
        save_char_tokenizer(tmp, 4096)
        del base
        requests = [GenerationRequest(list(range(1, 65)), n=4, max_tokens=128) for _ in range(8)]
        hf = HFEngine(tmp, dtype="bfloat16", device="cuda")
        start = time.perf_counter()
        done = hf.generate(requests)
        seconds = time.perf_counter() - start
        out["hf_tokens_per_s"] = round(sum(len(c.tokens) for r in done for c in r) / seconds, 1)
        del hf
        torch.cuda.empty_cache()
        try:
            import vllm  # noqa: F401
        except ImportError:
            out["vllm"] = "not installed"
            return out
        from asympo.engines.vllm_engine import VLLMEngine

        engine = VLLMEngine(tmp, dtype="bfloat16", max_model_len=1024, gpu_memory_utilization=0.3)
        try:
            start = time.perf_counter()
            done = engine.generate(requests)
            seconds = time.perf_counter() - start
            generated = sum(len(c.tokens) for r in done for c in r)
            out["vllm_tokens_per_s"] = round(generated / seconds, 1)
            before = engine.probe_logprobs(list(probe.tokens))
            start = time.perf_counter()
            engine.load_weights({k: v.to(torch.bfloat16) for k, v in weights.items()})
            out["vllm_swap_s"] = round(time.perf_counter() - start, 2)
            got = engine.probe_logprobs(list(probe.tokens))
            gap = max(abs(a - b) for a, b in zip(got, probe.logprobs, strict=True))
            moved = max(abs(a - b) for a, b in zip(got, before, strict=True))
            out["probe_max_abs_diff"] = round(gap, 5)
            out["probe_ok"] = gap <= probe.tolerance and moved > probe.tolerance
        finally:
            engine.close()
    return out


def main() -> int:
    """Run the checks; print a report (or JSON); exit 0 if every check passed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--steps", type=int, default=3, help="timed learner steps per model")
    parser.add_argument("--sizes", default="qwen3-0.6b,qwen3-1.7b", help="keys of ARCHS")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; run it on an NVIDIA GPU node", file=sys.stderr)
        return 2
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    unknown = [s for s in sizes if s not in ARCHS]
    if unknown:
        print(f"gpu_check: unknown size {unknown}; known: {', '.join(ARCHS)}", file=sys.stderr)
        return 2
    _init_group()
    report: dict[str, Any] = {"gpu": torch.cuda.get_device_name(0), "learner": []}
    for key in sizes:
        report["learner"].append(learner_check(key, args.steps))
        torch.cuda.empty_cache()
        if not args.json:
            print(json.dumps(report["learner"][-1]))
    report["generation"] = generation_check(sizes[0])
    ok = report["generation"].get("probe_ok", True)
    print(json.dumps(report, indent=None if args.json else 2))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
