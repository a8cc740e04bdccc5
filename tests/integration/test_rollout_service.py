"""Rollout service on the real tiny model and vLLM engine: version tags and proven swaps.

Real Redis, a real in-process weights service, the real engine. Reference outputs come
from transformers on the same weights (greedy, so they are deterministic).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import redis
import torch

from asympo.config import Settings, StreamSettings
from asympo.engines import Completion, Engine, GenerationRequest, create_engine
from asympo.model import ensure_default_model, load_causal_lm, load_tokenizer
from asympo.rl.probe import make_probe, probe_tokens
from asympo.transport.redis_conn import connect
from asympo.transport.streams import Consumer, Producer
from asympo.transport.weights_client import WeightsClient
from asympo.v1 import records_pb2
from services.rollout import metrics
from services.rollout.swap import WeightSwapper
from services.rollout.versions import VersionFollower
from services.rollout.worker import RolloutWorker
from services.weights.server import StreamAnnouncer, WeightsService

pytestmark = pytest.mark.vllm

TOKEN = "rollout-test-token"
MAX_TOKENS = 6


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return ensure_default_model(Settings())


@pytest.fixture(scope="module")
def engine(model_dir: Path) -> Iterator[Engine]:
    eng = create_engine(Settings(), str(model_dir))
    yield eng
    eng.close()


class GenerateSpy:
    """The real engine, plus an event set when a generate call starts (to time a swap)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.name = engine.name
        self.max_model_len = engine.max_model_len
        self.started = threading.Event()

    def encode(self, text: str) -> list[int]:
        return self.engine.encode(text)

    def decode(self, tokens: Sequence[int]) -> str:
        return self.engine.decode(tokens)

    def generate(self, requests: Sequence[GenerationRequest]) -> list[list[Completion]]:
        self.started.set()
        return self.engine.generate(requests)

    def load_weights(self, source: Any) -> None:
        self.engine.load_weights(source)

    def probe_logprobs(self, tokens: Sequence[int]) -> list[float]:
        return self.engine.probe_logprobs(tokens)

    def close(self) -> None:
        pass


@pytest.fixture
def settings(tmp_path: Path, stream_settings: StreamSettings, model_dir: Path) -> Settings:
    return Settings(
        streams=stream_settings,
        weights={"store_dir": str(tmp_path / "store"), "publish_token": TOKEN},  # type: ignore[arg-type]
        rollout={"work_dir": str(tmp_path / "rollout"), "replica": "r0"},  # type: ignore[arg-type]
        model={"path": str(model_dir)},  # type: ignore[arg-type]
    )


@pytest.fixture
def weights(settings: Settings, redis_url: str) -> Iterator[tuple[WeightsService, WeightsClient]]:
    announcer = StreamAnnouncer(
        lambda: connect(redis_url), settings.streams.key(settings.streams.weights), 1000
    )
    svc = WeightsService(settings, announce=announcer, grpc_port=0, http_port=0).start()
    client = WeightsClient(f"127.0.0.1:{svc.grpc_port}", token=TOKEN)
    yield svc, client
    client.close()
    svc.stop(grace=0.5)


def perturbed_states(model: torch.nn.Module, n: int) -> list[dict[str, torch.Tensor]]:
    """``n`` state dicts: the base weights, then successively perturbed copies."""
    states = [{k: v.clone() for k, v in model.state_dict().items()}]
    gen = torch.Generator().manual_seed(7)
    for _ in range(n - 1):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * p.std() * torch.randn(p.shape, generator=gen))
        states.append({k: v.clone() for k, v in model.state_dict().items()})
    return states


def hf_greedy(model: Any, prompts: list[list[int]]) -> list[list[int]]:
    out = []
    with torch.no_grad():
        for ids in prompts:
            gen = model.generate(
                torch.tensor([ids]), max_new_tokens=MAX_TOKENS, do_sample=False, pad_token_id=0
            )
            out.append(gen[0, len(ids) :].tolist())
    return out


def publish(
    client: WeightsClient,
    model: Any,
    state: dict[str, torch.Tensor],
    version: int,
    shift: float = 0.0,
) -> None:
    model.load_state_dict(state)
    probe = make_probe(model, probe_tokens(model.config.vocab_size), tolerance=1e-3)
    if shift:
        probe.logprobs[:] = [x + shift for x in probe.logprobs]
    client.publish_state_dict(state, version=version, parent_version=version - 1, probe=probe)


def admit(
    client: redis.Redis, settings: Settings, texts: list[str], min_version: int, start: int
) -> None:
    producer = Producer.from_settings(
        client, settings.streams, settings.streams.prompts, records_pb2.PromptTask
    )
    for i, text in enumerate(texts):
        producer.send(
            records_pb2.PromptTask(
                run_id=settings.streams.run_id,
                prompt_id=f"0:{start + i}",
                seq=start + i,
                task="arith",
                prompt_text=text,
                num_samples=2,
                sampling=records_pb2.SamplingParams(
                    temperature=0.0, top_p=1.0, max_tokens=MAX_TOKENS
                ),
                min_version=min_version,
            )
        )


def drain(client: redis.Redis, settings: Settings) -> dict[str, records_pb2.RolloutGroup]:
    consumer = Consumer.from_settings(
        client, settings.streams, settings.streams.rollouts, "check", "c", records_pb2.RolloutGroup
    )
    out: dict[str, records_pb2.RolloutGroup] = {}
    for d in consumer.read(count=1000, block_ms=100):
        out[d.msg.prompt.prompt_text] = d.msg
        consumer.ack(d)
    return out


def test_version_tags_exact_across_a_swap_during_generation(
    settings: Settings,
    engine: Engine,
    model_dir: Path,
    redis_client: redis.Redis,
    weights: tuple[WeightsService, WeightsClient],
) -> None:
    _, wclient = weights
    hf = load_causal_lm(str(model_dir))
    tok = load_tokenizer(str(model_dir))
    states = perturbed_states(hf, 3)
    spy = GenerateSpy(engine)
    swapper = WeightSwapper(spy, -1, model_dir)
    follower = VersionFollower.from_settings(settings, redis_client, wclient, swapper)
    worker = RolloutWorker(settings, redis_client, spy, swapper)  # type: ignore[arg-type]
    texts = [f"{a}+{b}=" for a in range(10, 14) for b in range(20, 28)]  # 32 prompts

    def expected(state: dict[str, torch.Tensor], batch: list[str]) -> dict[str, list[int]]:
        hf.load_state_dict(state)
        ids = [tok.encode(t, add_special_tokens=False) for t in batch]
        return {t: e for t, e in zip(batch, hf_greedy(hf, ids), strict=True)}

    def check(
        groups: dict[str, records_pb2.RolloutGroup], version: int, want: dict[str, list[int]]
    ) -> None:
        assert set(groups) == set(want)
        for text, group in groups.items():
            for s in group.samples:
                assert (s.version.start, s.version.end) == (version, version), text
            got = list(group.samples[0].completion_tokens)
            ref = want[text]
            # HF stops at EOS too; compare the common length (stop strings cut vLLM earlier).
            n = min(len(got), len(ref))
            assert n > 0 and got[:n] == ref[:n], (text, got, ref)

    # v0: the learner's first publish of the base weights, proven by its probe.
    publish(wclient, hf, states[0], 0)
    assert follower.apply(0) is not None and swapper.version == 0
    admit(redis_client, settings, texts[:8], 0, 0)
    while worker.step(block_ms=100):
        pass
    check(drain(redis_client, settings), 0, expected(states[0], texts[:8]))

    # v1 swapped in, then v2 requested while a batch generates with v1.
    publish(wclient, hf, states[1], 1)
    assert follower.apply(1).accepted  # type: ignore[union-attr]
    publish(wclient, hf, states[2], 2)
    admit(redis_client, settings, texts[8:24], 1, 8)
    spy.started.clear()
    gen_thread = threading.Thread(target=worker.step, kwargs={"block_ms": 100})
    gen_thread.start()
    assert spy.started.wait(60)
    swap_result: list[Any] = []
    swap_thread = threading.Thread(target=lambda: swap_result.append(follower.apply(2)))
    swap_thread.start()
    gen_thread.join(120)
    swap_thread.join(120)
    assert swap_result[0].accepted and swapper.version == 2
    check(drain(redis_client, settings), 1, expected(states[1], texts[8:24]))

    admit(redis_client, settings, texts[24:], 2, 24)
    while worker.step(block_ms=100):
        pass
    check(drain(redis_client, settings), 2, expected(states[2], texts[24:]))


def test_wrong_probe_refused_and_old_version_kept(
    settings: Settings,
    engine: Engine,
    model_dir: Path,
    redis_client: redis.Redis,
    weights: tuple[WeightsService, WeightsClient],
) -> None:
    _, wclient = weights
    hf = load_causal_lm(str(model_dir))
    states = perturbed_states(hf, 2)
    swapper = WeightSwapper(engine, -1, model_dir)
    follower = VersionFollower.from_settings(settings, redis_client, wclient, swapper)
    publish(wclient, hf, states[0], 0)
    assert follower.apply(0).accepted  # type: ignore[union-attr]
    hf.load_state_dict(states[0])
    tokens = probe_tokens(hf.config.vocab_size)
    before = engine.probe_logprobs(tokens)
    mismatches = metrics.PROBE_MISMATCH._value.get()
    publish(wclient, hf, states[1], 1, shift=0.5)  # the learner "recorded" other log-probs
    outcome = follower.apply(1)
    assert outcome is not None and not outcome.accepted and outcome.reason == "probe mismatch"
    assert swapper.version == 0
    assert metrics.PROBE_MISMATCH._value.get() == mismatches + 1
    after = engine.probe_logprobs(tokens)  # the old weights are back in the engine
    assert max(abs(a - b) for a, b in zip(before, after, strict=True)) < 1e-4
    assert follower.apply(1) is None  # a refused version is not retried
