"""What the benchmark scripts share: a free launcher port, the command line they record, and each script's own
marked section of RESULTS.md."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from aligner.models.loading import free_port  # noqa: F401  (re-exported for the scripts)


def write_section(path: Path, name: str, text: str) -> None:
    """Replace the ``<!-- name:begin -->`` … ``<!-- name:end -->`` section of ``path``, or append it."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    current = path.read_text() if path.is_file() else "# Benchmark results\n"
    block = f"{begin}\n{text}\n{end}"
    if begin in current and end in current:
        current = current[:current.index(begin)] + block + current[current.index(end) + len(end):]
    else:
        current = current.rstrip() + "\n\n" + block + "\n"
    path.write_text(current)


def command_line(script: str, argv: list[str] | None) -> str:
    """How a benchmark was run, as its RESULTS.md section records it: ``python benchmarks/<script> <args>``."""
    args = sys.argv[1:] if argv is None else argv
    return " ".join(["python", f"benchmarks/{Path(script).name}", *([shlex.join(args)] if args else [])])
