"""A verifier worker process: ``python -m asympo.verifiers.worker`` (started by VerifierPool).

Protocol, one JSON object per line (never pickle): the first line on stdin is the
configuration ``{"plugins": {...}, "format_reward": f, "sys_path": [...]}``; the worker
answers ``{"ready": true}`` once its imports are done. Then each request line
``{"verifier", "response", "reference"}`` gets one verdict line
``{"reward", "reason", "timed_out", "failed", "shaped"}``. The protocol uses a private copy of
the original stdout; file descriptor 1 is pointed at stderr so that a plug-in's
``print`` cannot corrupt it. The worker exits on EOF, and on its own when its parent
dies (a hung verifier would otherwise outlive a killed service).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from typing import IO, Any


def _watch_parent(parent: int, interval_s: float = 0.5) -> None:
    while True:
        time.sleep(interval_s)
        if os.getppid() != parent:
            os._exit(0)


def _reply(out: IO[bytes], payload: dict[str, Any]) -> None:
    out.write(json.dumps(payload).encode() + b"\n")
    out.flush()


def main() -> None:
    """Serve verification requests from stdin until EOF."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the pool decides when workers stop
    threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True).start()
    protocol = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    requests = sys.stdin.buffer
    config = json.loads(requests.readline() or b"{}")
    for entry in reversed(config.get("sys_path", [])):
        if entry not in sys.path:
            sys.path.insert(0, entry)
    plugins: dict[str, str] = config.get("plugins", {})
    format_reward = float(config.get("format_reward", 0.0))

    from asympo.verifiers.registry import UnknownVerifierError, resolve_verifier, run_verifier
    from asympo.verifiers.verdict import VerifierFn

    cache: dict[str, VerifierFn] = {}
    _reply(protocol, {"ready": True})
    for line in requests:
        job = json.loads(line)
        name = str(job["verifier"])
        try:
            fn = cache.get(name) or resolve_verifier(name, plugins)
        except UnknownVerifierError as exc:
            _reply(
                protocol, {"reward": 0.0, "reason": str(exc), "timed_out": False, "failed": True}
            )
            continue
        cache[name] = fn
        verdict = run_verifier(fn, name, str(job["response"]), str(job["reference"]), format_reward)
        _reply(
            protocol,
            {
                "reward": verdict.reward,
                "reason": verdict.reason,
                "timed_out": verdict.timed_out,
                "failed": verdict.failed,
                "shaped": verdict.shaped,
            },
        )


if __name__ == "__main__":
    main()
