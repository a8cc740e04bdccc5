"""The direct broadcast transport between two real processes over a standalone gloo group."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from asympo.transport.weight_broadcast import BroadcastGroup, Layout
from tests.integration.test_weights_service import tiny_qwen2

RECEIVER = """
import sys
from pathlib import Path
from safetensors.torch import save_file
from asympo.transport.weight_broadcast import BroadcastGroup, Layout
from tests.integration.test_weights_service import tiny_qwen2
port, out, n = int(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
import torch
model = tiny_qwen2(seed=99)  # same layout, other numbers
model.model.layers[0].mlp.to(torch.bfloat16)
state = model.state_dict()
group = BroadcastGroup("127.0.0.1", port, 1, 2, Layout.of(state))
for _ in range(n):
    version, got = group.receive()
    save_file({k: v.clone() for k, v in got.items()}, str(out / f"{version}.safetensors"))
group.close()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_three_versions_arrive_bit_identical_in_their_dtypes(tmp_path: Path) -> None:
    port = _free_port()
    model = tiny_qwen2()
    model.model.layers[0].mlp.to(torch.bfloat16)  # two dtype buckets
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    child = subprocess.Popen(
        [sys.executable, "-c", RECEIVER, str(port), str(tmp_path), "3"], env=env
    )
    try:
        state = model.state_dict()
        group = BroadcastGroup("127.0.0.1", port, 0, 2, Layout.of(state))
        sent: dict[int, dict[str, torch.Tensor]] = {}
        for version in (4, 5, 6):
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn(p.shape).to(p.dtype))
            state = model.state_dict()
            group.send(version, state)
            sent[version] = {k: v.clone() for k, v in state.items()}
        assert child.wait(60) == 0
        group.close()
    finally:
        if child.poll() is None:
            child.kill()
    for version, expected in sent.items():
        got = load_file(str(tmp_path / f"{version}.safetensors"))
        assert set(got) == set(expected)
        for name, tensor in expected.items():
            assert got[name].dtype == tensor.dtype, name
            assert torch.equal(got[name], tensor), name
