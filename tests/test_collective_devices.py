"""Every collective aligner issues puts its tensors on the device of the backend it goes through (aligner/distributed/comm.py).

A process group initialised as ``cuda:gloo`` serves CUDA tensors only, as NCCL does: a CPU tensor handed to it
raises "No backend type associated with device type cpu". On this CPU-only machine a site that asks for the
backend's device instead reaches for CUDA and gets torch's "Torch not compiled with CUDA enabled": that is the
proof it would have used the GPU. Under plain gloo every site runs. Both ranks of one spawn run every site.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from aligner.distributed.comm import backend_device_type
from aligner.models.loading import free_port
from collective_sites import sites

pytestmark = pytest.mark.subprocess  # the module's fixture spawns the 2 ranks


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory) -> dict[str, str]:
    out = tmp_path_factory.mktemp("collectives")
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    script = Path(__file__).with_name("collective_sites.py")
    procs = [subprocess.Popen([sys.executable, str(script), str(rank), str(port), str(out)], env=env)
             for rank in range(2)]
    assert [p.wait(timeout=240) for p in procs] == [0, 0]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0].keys() == ranks[1].keys()
    return ranks[0]


@pytest.mark.parametrize("site", list(sites()))
def test_each_collective_targets_the_backends_device(outcomes, site):
    assert outcomes[f"gloo {site}"] == "ok"
    assert outcomes[f"cuda:gloo {site}"] == "AssertionError: Torch not compiled with CUDA enabled", outcomes


def test_without_a_process_group_collectives_stay_on_the_cpu():
    assert backend_device_type() == "cpu"


def test_a_tensor_on_the_wrong_device_is_reported_as_the_cause_not_as_a_lost_peer():
    from aligner.recipes.train import lost_peer

    assert not lost_peer(RuntimeError("No backend type associated with device type cpu"))
    assert not lost_peer(RuntimeError("Tensor found on device cuda:0 but backend constrained to cuda:1"))
    assert lost_peer(RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer"))
