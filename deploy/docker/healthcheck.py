"""Container health check: exit 0 when this container's service answers /healthz.

A container runs exactly one ASymPO service, and each service listens for HTTP on
its own port from the configuration (defaults and ASYMPO_* overrides, the same
resolution the service itself uses). So we ask every service's port on loopback
and are healthy if one of them answers 200. HEALTH_PORT pins the port explicitly.
"""

from __future__ import annotations

import os
import sys
import urllib.request

from asympo.config import load_settings


def candidate_ports() -> list[int]:
    """The HTTP ports this container's service may listen on."""
    if os.environ.get("HEALTH_PORT"):
        return [int(os.environ["HEALTH_PORT"])]
    s = load_settings()
    return [s.weights.http_port, s.reward.http_port, s.rollout.http_port, s.learner.http_port]


def healthy(port: int) -> bool:
    """True when http://127.0.0.1:port/healthz answers 200 within 3 s."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=3) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


if __name__ == "__main__":
    sys.exit(0 if any(healthy(p) for p in candidate_ports()) else 1)
