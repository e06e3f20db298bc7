"""Multi-node on one machine: two "nodes" of one rank each, two DeepSpeed launchers, one shared output_dir.

Each node is its own ``deepspeed --hostfile H --no_ssh --node_rank K --master_addr
127.0.0.1`` process (the launcher's multi-node mode without ssh, as on a cluster where
a scheduler starts one launcher per node). The script shows, on the embedded task:

1. ``one node``: the same run as 2 ranks on one node (the reference losses);
2. ``two nodes``: training and checkpoints as on one node (per-step losses compared bit for bit);
3. ``node 1 lost``: node 1's rank is SIGKILLed after step 5 (the test-only faults plugin), so node 1's
   launcher ends too; node 0 must stop on its own with the "lost contact" line, step_3 intact;
4. ``resumed``: both nodes rerun with ``--resume auto``; the losses must equal the uninterrupted run's.

    python benchmarks/multinode_local.py
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_md import command_line, free_port, write_section  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PLUGINS = ["--plugins", "dpo,plugin_fixtures.faults:faults"]
SHORT = ["train.max_steps=8", "train.save_every=3", "eval.every=0", "data.eval=null"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
       "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "tests"), os.environ.get("PYTHONPATH")]))}


def deepspeed() -> str:
    return str(Path(sys.executable).with_name("deepspeed"))


def one_node(out: Path) -> list[subprocess.CompletedProcess]:
    cmd = [deepspeed(), "--num_gpus", "2", "--master_port", str(free_port()), str(ROOT / "launch" / "train.py"),
           *PLUGINS, "--set", f"output_dir={out}", *SHORT]
    return [subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)]


def two_nodes(out: Path, hostfile: Path, *extra: str) -> list[subprocess.CompletedProcess]:
    """Start both nodes' launchers at once and wait for both."""
    port = str(free_port())
    procs = []
    for node in (0, 1):
        cmd = [deepspeed(), "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(node), "--master_addr",
               "127.0.0.1", "--master_port", port, str(ROOT / "launch" / "train.py"), *PLUGINS,
               "--set", f"output_dir={out}", *SHORT, *extra]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    return [subprocess.CompletedProcess(p.args, p.returncode, o, "") for p, o in zip(procs, outputs)]


def losses(out: Path) -> list[tuple[int, float]]:
    from aligner.evaluation.report import read_scalars

    return read_scalars(out / "tensorboard")["train/loss"]


def checkpoints(out: Path) -> str:
    from aligner.training import checkpoint

    return ", ".join(p.name for p in checkpoint.list_checkpoints(out)) or "none"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "RESULTS.md")
    args = p.parse_args(argv)
    rows, ok = [], True
    with tempfile.TemporaryDirectory(prefix="multinode-") as tmp:
        tmp = Path(tmp)
        hostfile = tmp / "hostfile"
        hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
        single, multi = tmp / "one-node", tmp / "two-nodes"
        phases = [("one node (2 ranks)", single, lambda: one_node(single)),
                  ("two nodes x 1 rank", multi / "a", lambda: two_nodes(multi / "a", hostfile)),
                  ("two nodes, node 1 lost after step 5", multi / "b",
                   lambda: two_nodes(multi / "b", hostfile, "faults.kill_at_step=5")),
                  ("two nodes, --resume auto", multi / "b", lambda: two_nodes(multi / "b", hostfile, "--resume", "auto"))]
        reference = None
        for name, out, start in phases:
            procs = start()
            text = "".join(p.stdout + p.stderr for p in procs)
            codes = " / ".join(str(p.returncode) for p in procs)
            got = losses(out) if (out / "tensorboard").is_dir() else []
            reference = reference or got
            if name.startswith("two nodes, node 1 lost"):
                same = "-"
                lost = "lost contact with another rank" in text
                ok &= lost and checkpoints(out) == "step_3"
                note = "node 0 says 'lost contact', step_3 intact" if lost else "no lost-contact line"
            else:
                same = "yes" if got == reference and len(got) == 8 else "NO"
                ok &= same == "yes" and all(p.returncode == 0 for p in procs)
                note = "resumed from step_3" if "step_3 at step 3" in text else ""
            rows.append(f"| {name} | {codes} | {checkpoints(out)} | {len(got)} | {same} | {note} |")
            print(rows[-1], flush=True)
    table = "\n".join([f"Command: `{command_line(__file__, argv)}`", "",
                       "| phase | exit codes (per launcher) | complete checkpoints | steps logged | losses = one node's, bitwise | note |",
                       "|---|---|---|---|---|---|", *rows])
    print(table)
    write_section(args.results, "multinode_local", table)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
