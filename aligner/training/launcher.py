"""The one command line that starts a multi-rank run on this machine, for tests, benchmarks and users' scripts.

``deepspeed --num_gpus N --master_port P script args...``: the DeepSpeed launcher on a free rendezvous port, so
that several launches can run side by side (PLATFORM.md: the default port 29500 would collide).
"""

from __future__ import annotations

import sys
from pathlib import Path

from aligner.models.loading import free_port

#: The training entry script of this checkout (``launch/train.py``).
TRAIN_SCRIPT = Path(__file__).resolve().parents[2] / "launch" / "train.py"


def deepspeed_command(args: list[str], nproc: int = 2, script: str | Path = TRAIN_SCRIPT) -> list[str]:
    """The DeepSpeed launcher running ``script`` (default: the trainer) with ``args`` on ``nproc`` local ranks."""
    deepspeed = Path(sys.executable).with_name("deepspeed")
    return [str(deepspeed), "--num_gpus", str(nproc), "--master_port", str(free_port()), str(script), *args]
