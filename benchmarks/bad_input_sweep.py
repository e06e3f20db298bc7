"""The bad-input sweep: 58 wrong inputs and faults, tried as a new user would, each judged by what the user sees.

Every case is run for real: ``aligner-train`` as one process (or two ranks through the
DeepSpeed launcher where the case needs them), ``launch/eval.py``, ``aligner-estimate``.
A case names the exit code it should end with and a fragment of the message that
should say what is wrong and where. The verdict:

- **good**: that exit code, that message, no traceback, no ``terminate called``, no hang;
- **poor**: that exit code, but the message is not the expected one (or comes with a traceback);
- **bad**: another exit code, or a hang (the case's timeout).

The table prints case, exit code, message (the ``aligner: error:`` line, or the last line)
and verdict. The cases that need no engine also run in CI, in-process, from this same table
(tests/test_bad_input_sweep.py, through :func:`in_process`); the others (signals, faults,
2-rank runs, launched processes) run only here.

The 58 cases rebuild the sweep of issue 29, whose case list was not kept: config (16),
plugin names (6), dataset files and rows (17), models and Hub IDs (4), the eval and
estimate tools (4), checkpoints and output_dir (6), signals and faults (5).

    python benchmarks/bad_input_sweep.py                     # all 58 cases
    python benchmarks/bad_input_sweep.py --only here         # the cases CI does not run
    python benchmarks/bad_input_sweep.py --only data,signals # groups (or case names)
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
FAST = ["train.max_steps=2", "eval.every=0", "data.eval=null", "train.cache_static_logps=false"]
FAULTS = "dpo,plugin_fixtures.faults:faults"


@dataclass(frozen=True)
class Case:
    """One bad input. ``argv(tmp)`` builds what the user types (files it needs go under ``tmp``); ``tool`` runs it:
    ``train`` (one process), ``train2`` (2 ranks, DeepSpeed launcher), ``eval``, ``estimate``, or a name of
    :data:`SPECIAL`. ``says`` is formatted with ``tmp``. ``stage``: how CI checks it in-process (:func:`in_process`),
    or None for the cases only this script runs."""

    name: str
    group: str
    argv: Callable[[Path], list[str]]
    code: int | tuple[int, ...]  #: the exit code, or those allowed where a third party's code decides it
    says: str
    stage: str | None
    tool: str = "train"


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def rows(*items: dict) -> str:
    return "".join(json.dumps(r) + "\n" for r in items)


PAIR = {"prompt": "sort 3 1 2", "chosen": " 1 2 3", "rejected": " 3 2 1"}
MSG = [{"role": "user", "content": "sort 3 1"}]


def yaml_file(tmp: Path, text: str) -> list[str]:
    return ["--config", str(write(tmp / "run.yaml", text))]


def data(tmp: Path, name: str, text: str | bytes, *more: str) -> list[str]:
    return ["--set", f"data.train={write(tmp / name, text)}", f"output_dir={tmp / 'out'}", *FAST, *more]


def sets(*items: str) -> Callable[[Path], list[str]]:
    return lambda tmp: ["--set", f"output_dir={tmp / 'out'}", *FAST, *items]


def checkpoint_folder(tmp: Path, step: int = 2, marker: bool = True) -> Path:
    from aligner.training import checkpoint

    folder = tmp / "out" / "checkpoints" / f"step_{step}"
    write(folder / "zero_pp_rank_0_mp_rank_00_model_states.pt", b"shard bytes")
    if marker:
        files = {"zero_pp_rank_0_mp_rank_00_model_states.pt": {"size": 11, "digest": "xxh3_128:" + "0" * 32}}
        write(folder / checkpoint.MARKER, json.dumps({"step": step, "world_size": 1, "files": files}))
    write(tmp / "out" / "config.json", "{}")
    return folder


def embedded_model_dir() -> str:
    from aligner.data import embedded

    return str(embedded.ensure_embedded_model("embedded:tiny-sort"))


CASES: list[Case] = [
    # -- config ------------------------------------------------------------------------------------------------
    Case("config file missing", "config", lambda t: ["--config", str(t / "nope.yaml")], 2,
         "config file {tmp}/nope.yaml does not exist", "main"),
    Case("config not YAML", "config", lambda t: yaml_file(t, "train: [1, 2\n"), 2, "is not valid YAML", "main"),
    Case("config a list", "config", lambda t: yaml_file(t, "- train\n- data\n"), 2,
         "must hold a mapping of keys (model:, data:, train:, ...), got list", "main"),
    Case("unknown top-level key in YAML", "config", lambda t: yaml_file(t, "trian: {max_steps: 3}\n"), 2,
         "{tmp}/run.yaml: unknown key 'trian'; the top-level keys are", "main"),
    Case("unknown key in a YAML section", "config", lambda t: yaml_file(t, "train: {max_step: 3}\n"), 2,
         "{tmp}/run.yaml: unknown key 'train.max_step'; the keys of 'train' are", "main"),
    Case("unknown key by --set", "config", sets("train.bogus=1"), 2,
         "--set train.bogus=1: unknown key 'train.bogus'; the keys of 'train' are", "main"),
    Case("wrong type by --set", "config", sets("train.max_steps=many"), 2,
         "--set train.max_steps=many: key 'train.max_steps' expects an integer, got 'many'", "main"),
    Case("out of range by --set", "config", sets("train.max_steps=0"), 2,
         "--set train.max_steps=0: train.max_steps must be > 0, got 0", "main"),
    Case("out of range in YAML", "config", lambda t: yaml_file(t, "train: {micro_batch_size: 0}\n"), 2,
         "{tmp}/run.yaml: train.micro_batch_size must be > 0, got 0", "main"),
    Case("bad loss weight by --set", "config", sets("dpo.weight=-1"), 2,
         "--set dpo.weight=-1: section 'dpo': weight must be a finite number >= 0, got -1.0", "main"),
    Case("the only loss weighs 0", "config", sets("dpo.weight=0"), 2,
         "dpo.weight=0: every loss of the run weighs 0, so train/loss is 0 and nothing trains", "main"),
    Case("--set without =", "config", lambda t: ["--set", "train.max_steps"], 2,
         "--set 'train.max_steps': expected key=value", "main"),
    Case("not one of the choices", "config", sets("train.on_nonfinite=ignore"), 2,
         "train.on_nonfinite must be one of stop, skip; got 'ignore'", "main"),
    Case("eval_fraction with data.eval", "config", lambda t: ["--set", "data.eval_fraction=0.1"], 2,
         "data.eval_fraction=0.1 carves the eval split out of data.train, but data.eval is set too", "main"),
    Case("max_prompt_length >= max_length", "config", sets("data.max_prompt_length=2048"), 2,
         "--set data.max_prompt_length=2048: data.max_prompt_length (2048) must be below data.max_length (64)", "main"),
    Case("negative lock_wait_s", "config", sets("train.lock_wait_s=-1"), 2,
         "--set train.lock_wait_s=-1: train.lock_wait_s must be >= 0, got -1", "main"),
    # -- plugin names --------------------------------------------------------------------------------------------
    Case("unknown plugin", "plugins", lambda t: ["--plugins", "dpoo"], 2, "unknown plugin 'dpoo' in --plugins.\navailable plugins:",
         "main"),
    Case("empty --plugins", "plugins", lambda t: ["--plugins", ""], 2, "--plugins '' names no plugin", "main"),
    Case("a plugin twice", "plugins", lambda t: ["--plugins", "dpo,dpo"], 2,
         "plugin 'dpo' is listed twice in --plugins; list each plugin once", "main"),
    Case("two reference updates", "plugins", lambda t: ["--plugins", "dpo,tr_soft,tr_hard"], 2,
         "a run takes at most one reference_update plugin, got tr_soft, tr_hard", "main"),
    Case("module:attr that does not import", "plugins", lambda t: ["--plugins", "nosuchmod:thing"], 2,
         "plugin 'nosuchmod:thing': cannot import module 'nosuchmod'", "main"),
    Case("section of an inactive plugin", "plugins", lambda t: yaml_file(t, "tr_soft: {alpha: 0.5}\n"), 2,
         "section 'tr_soft' configures plugin 'tr_soft', which is not active; add it to --plugins", "main"),
    # -- dataset files and rows -------------------------------------------------------------------------------
    Case("dataset file missing", "data", sets("data.train=/nonexistent/prefs.jsonl"), 2,
         "dataset /nonexistent/prefs.jsonl does not exist", "data"),
    Case("empty jsonl", "data", lambda t: data(t, "empty.jsonl", ""), 2, "is empty (0 bytes)", "data"),
    Case("only blank lines", "data", lambda t: data(t, "blank.jsonl", "\n\n  \n"), 2,
         "has no rows (only blank lines)", "data"),
    Case("a line without its closing brace", "data", lambda t: data(t, "cut.jsonl", rows(PAIR) + rows(PAIR)[:-2] + "\n"),
         2, "line 2 (row 1): not valid JSON (Expecting ',' delimiter at the end of the line)", "data"),
    Case("a line cut inside a string", "data", lambda t: data(t, "cut2.jsonl", rows(PAIR) + '{"prompt": "sort 3\n'), 2,
         "line 2 (row 1): not valid JSON (Unterminated string starting at column 12)", "data"),
    Case("invalid UTF-8", "data", lambda t: data(t, "latin1.jsonl", rows(PAIR).encode() + b'{"prompt": "caf\xe9"}\n'), 2,
         "line 2 (row 1): bytes b'\\xe9\"}}\\n' at byte 15 of the line are not valid UTF-8", "data"),
    Case("columns missing", "data", lambda t: data(t, "cols.jsonl", rows({"question": "q", "answer": "a"})), 2,
         "lacks column(s) chosen, rejected; it has question, answer", "data"),
    Case("chosen identical to rejected", "data",
         lambda t: data(t, "same.jsonl", rows({**PAIR, "rejected": PAIR["chosen"]})), 2,
         "row 0, column 'rejected': is identical to chosen", "data"),
    Case("a chat message without role", "data",
         lambda t: data(t, "norole.jsonl", rows({"chosen": [{"content": "sort 3 1"}, {"role": "assistant", "content": "1 3"}],
                                                 "rejected": [*MSG, {"role": "assistant", "content": "3 1"}]})), 2,
         "row 0, column 'chosen': message 0 has no 'role'; it must be a mapping with string 'role' and 'content'", "data"),
    Case("string and messages mixed", "data",
         lambda t: data(t, "mixed.jsonl", rows({"chosen": "sort 3 1 -> 1 3", "rejected": [*MSG]})), 2,
         "row 0, column 'rejected': is not of the same format as chosen", "data"),
    Case("unknown file type", "data", lambda t: data(t, "prefs.txt", "prompt chosen rejected\n"), 2,
         "unknown file type '.txt'; use .jsonl, .json, .parquet, .csv or .arrow", "data"),
    Case("mixture entry with a negative fraction", "data",
         sets("data.train=[{path: embedded:train, samples: -0.5}]"), 2,
         "data.train[0].samples: -0.5; give a row count (an integer >= 1) or a fraction in (0, 1]", "data"),
    Case("train_split on a jsonl file", "data", lambda t: data(t, "one.jsonl", rows(PAIR) * 20, "data.train_split=test_prefs"),
         2, "data.train_split='test_prefs': dataset {tmp}/one.jsonl is a single file, with no splits", "data"),
    Case("subset on a jsonl file", "data", lambda t: data(t, "one.jsonl", rows(PAIR) * 20, "data.subset=default"), 2,
         "data.subset='default': dataset {tmp}/one.jsonl is a single file, with no subsets", "data"),
    Case("fewer rows than one step", "data", lambda t: data(t, "three.jsonl", rows(PAIR) * 3), 2,
         "the dataset has 3 usable pairs, fewer than one step needs (train.micro_batch_size=8 x 1 ranks)", None),
    Case("data.columns names a missing column", "data",
         lambda t: data(t, "one.jsonl", rows(PAIR) * 20, "data.columns={prompt: question}"), 2,
         "data.columns.prompt: dataset {tmp}/one.jsonl has no column 'question'", "data"),
    Case("unpaired rows with a paired loss", "data",
         lambda t: data(t, "kto.jsonl", rows({"prompt": "sort 3 1", "completion": " 1 3", "label": True}) * 20), 2,
         "is unpaired (prompt, completion, label), but the loss 'dpo' trains on preference pairs", "data"),
    # -- models and Hub IDs ------------------------------------------------------------------------------------
    Case("model Hub ID not in the cache (offline)", "models", sets("model.name_or_path=nobody/no-such-model"), 2,
         "nobody/no-such-model", "models"),
    Case("dataset Hub ID not in the cache (offline)", "models", sets("data.train=nobody/no-such-data"), 2,
         "dataset nobody/no-such-data is not in the local Hugging Face cache and HF_HUB_OFFLINE=1 forbids", "data"),
    Case("model folder without config.json", "models",
         lambda t: sets(f"model.name_or_path={write(t / 'm' / 'README', 'x').parent}")(t), 2,
         "model.name_or_path: {tmp}/m is not a model folder (no config.json there)", "models"),
    Case("model path that is neither a folder nor an ID", "models", sets("model.name_or_path=/nonexistent/model"), 2,
         "/nonexistent/model is not a model folder (no config.json there) nor a Hub model ID", "models"),
    # -- the eval and estimate tools ---------------------------------------------------------------------------
    Case("eval --reward-model folder missing", "tools",
         lambda t: ["--model", "embedded:tiny-sort", "--anchor", "embedded:tiny-sort", "--data", "embedded:eval",
                    "--reward-model", str(t / "no-rm"), "--out", str(t / "e.json")], 2,
         "--reward-model: the folder {tmp}/no-rm does not exist", "eval", tool="eval"),
    Case("eval --reward-model not a reward model", "tools",
         lambda t: ["--model", "embedded:tiny-sort", "--anchor", "embedded:tiny-sort", "--data", "embedded:eval",
                    "--reward-model", embedded_model_dir(), "--out", str(t / "e.json")], 2,
         "a reward model has one score output", "eval", tool="eval"),
    Case("estimate --gpu-mem-gib negative", "tools",
         lambda t: ["--config", str(ROOT / "configs" / "tiny-cpu.yaml"), "--gpu-mem-gib", "-80"], 2,
         "--gpu-mem-gib must be a GPU's memory in GiB, a number > 0 (e.g. 80), got -80", "estimate", tool="estimate"),
    Case("estimate --config missing", "tools", lambda t: ["--config", str(t / "nope.yaml")], 2,
         "--config {tmp}/nope.yaml: no such file", "estimate", tool="estimate"),
    # -- checkpoints and output_dir ----------------------------------------------------------------------------
    Case("--resume auto where no run was", "checkpoints", lambda t: [*sets()(t), "--resume", "auto"], 2,
         "--resume auto: output_dir {tmp}/out holds no run to resume", "output"),
    Case("--resume a missing folder", "checkpoints", lambda t: [*sets()(t), "--resume", str(t / "nope")], 2,
         "--resume {tmp}/nope: no such checkpoint folder", "output"),
    Case("--resume a half-written save", "checkpoints",
         lambda t: [*sets()(t), "--resume", str(checkpoint_folder(t, marker=False))], 2,
         "not a complete aligner checkpoint (no aligner_checkpoint.json", "output"),
    Case("a new run where checkpoints are", "checkpoints", lambda t: (checkpoint_folder(t), sets()(t))[1], 2,
         "output_dir {tmp}/out already holds checkpoints (step_2); pass --resume auto", "output"),
    Case("--resume a damaged checkpoint", "checkpoints",
         lambda t: [*sets()(t), "--resume", str(checkpoint_folder(t))], 2,
         "the checkpoint is damaged: its file {tmp}/out/checkpoints/step_2/zero_pp_rank_0_mp_rank_00_model_states.pt "
         "does not match its digest", "output"),
    Case("output_dir under a regular file", "checkpoints",
         lambda t: sets(f"output_dir={write(t / 'notes.txt', 'x') / 'run'}")(t), 2,
         "output_dir {tmp}/notes.txt/run cannot be created: Not a directory", "output"),
    # -- signals and faults (real runs: this script only) --------------------------------------------------------
    Case("SIGTERM to a rank", "signals", lambda t: ["--plugins", FAULTS, *sets("train.max_steps=8", "faults.signal_at_step=3",
                                                                                 "faults.signal=SIGTERM")(t)], 5,
         "stopped after step 3 (rank 1: received SIGTERM); checkpoint", None, tool="train2"),
    Case("Ctrl-C to a 2-rank job under deepspeed", "signals", lambda t: sets("train.max_steps=100000")(t), (-2, 1),
         "received SIGINT); checkpoint {tmp}/out/checkpoints/step_", None, tool="ctrl_c"),
    Case("NaN loss on one rank", "signals", lambda t: ["--plugins", FAULTS, *sets("train.max_steps=8", "faults.nan_loss_at=3",
                                                                                  "faults.nan_rank=1")(t)], 3,
         "non-finite loss at step 3 (examples sort-train-", None, tool="train2"),
    Case("file-size limit during a save", "signals",
         lambda t: ["--plugins", FAULTS, *sets("train.max_steps=8", "train.save_every=3", "faults.fsize_limit_after_step=4")(t)],
         2, "checkpoint step_6 was not saved: rank 1 could not write", None, tool="train2"),
    Case("a second job on the same output_dir", "signals", lambda t: sets("train.max_steps=100000")(t), 2,
         "is in use by another job (host ", None, tool="second_job"),
]


# -- in-process checks (CI) -------------------------------------------------------------------------------------
def in_process(case: Case, tmp: Path) -> tuple[int, str]:
    """(exit code, what the user reads) of ``case`` without a launched process: through ``aligner.recipes.train.main``
    for config errors, or through the same functions the recipe calls up to the failing stage, the exception mapped to
    its exit code as ``main`` maps it."""
    from aligner.models.loading import run_tokenizer
    from aligner.models.plan import make_plan
    from aligner.recipes import train
    from aligner.tools import estimate
    from aligner.training import teardown

    argv = case.argv(tmp)
    err = io.StringIO()
    if case.stage in ("main", "estimate", "eval"):
        fn = {"main": train.main, "estimate": estimate.main, "eval": _eval_main()}[case.stage]
        with contextlib.redirect_stderr(err):
            try:
                code = fn(argv)
            except SystemExit as exc:  # argparse's own errors
                code = exc.code
        return code, err.getvalue()
    args = train.parse_args(argv)
    try:
        cfg, plugins = train.configure(args)
        if case.stage == "output":
            train.claim_output_dir(cfg, args, 0, 1)
        else:
            paths = train.model_paths(cfg, make_plan(cfg, plugins))
            if case.stage == "data":
                train.load_examples(run_tokenizer(cfg, paths["policy"]), cfg, plugins)
    except train.USER_ERRORS + (train.RunError,) as exc:
        return 2, f"aligner: error: {exc}"
    finally:
        teardown.shutdown()  # what main does at the end: the job lock, if one was taken, is released
    return 0, ""


def _eval_main():
    import importlib.util

    spec = importlib.util.spec_from_file_location("aligner_eval_script", ROOT / "launch" / "eval.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


# -- real processes (this script) -------------------------------------------------------------------------------
def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "tests"), os.environ.get("PYTHONPATH")]))}


def _command(case: Case, argv: list[str]) -> list[str]:
    from aligner.training.launcher import deepspeed_command

    if case.tool == "eval":
        return [sys.executable, str(ROOT / "launch" / "eval.py"), *argv]
    if case.tool == "estimate":
        return [sys.executable, "-m", "aligner.tools.estimate", *argv]
    if case.tool == "train2":
        return deepspeed_command(argv, 2)
    return [sys.executable, str(ROOT / "launch" / "train.py"), *argv]


def _ctrl_c(case: Case, tmp: Path, timeout: float) -> tuple[int | None, str]:
    """Ctrl-C as a terminal sends it: SIGINT to the job's whole process group (``deepspeed``, its node launcher,
    the ranks), once training has saved step_2. The exit code is the ``deepspeed`` command's, which DeepSpeed's runner
    decides (it has no SIGINT handler: killed by SIGINT, -2 here and 130 in a shell; 1 when its node launcher's exit
    is seen first); the ranks' stop line is the message judged, once every process of the job is gone."""
    from aligner.training.launcher import deepspeed_command

    argv = [*case.argv(tmp), "train.save_every=2"]
    log = tmp / "job.log"
    with log.open("w") as f:
        proc = subprocess.Popen(deepspeed_command(argv, 2), cwd=ROOT, env=_env(), stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while not (tmp / "out" / "checkpoints" / "step_2").is_dir() and time.monotonic() < deadline:
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGINT)
        while time.monotonic() < deadline:  # the ranks outlive the deepspeed command: wait for the whole group
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                break
            proc.poll()
            time.sleep(0.2)
        return proc.poll(), log.read_text()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


def _second_job(case: Case, tmp: Path, timeout: float) -> tuple[int | None, str]:
    """A job runs; the same command is typed again in another terminal."""
    argv = case.argv(tmp)
    first = subprocess.Popen(_command(case, argv), cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + timeout
        while not (tmp / "out" / "aligner.lock").is_file() and time.monotonic() < deadline:
            time.sleep(0.2)
        proc = subprocess.run(_command(case, argv), cwd=ROOT, env=_env(), capture_output=True, text=True,
                              timeout=timeout)
        return proc.returncode, proc.stdout + proc.stderr
    finally:
        first.kill()
        first.wait()


SPECIAL = {"ctrl_c": _ctrl_c, "second_job": _second_job}


def run_case(case: Case, tmp: Path, timeout: float) -> tuple[int | None, str]:
    """(exit code or None on a hang, output) of one real run."""
    if case.tool in SPECIAL:
        return SPECIAL[case.tool](case, tmp, timeout)
    try:
        proc = subprocess.run(_command(case, case.argv(tmp)), cwd=ROOT, env=_env(), capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        return None, (exc.stderr or b"").decode(errors="replace") if isinstance(exc.stderr, bytes) else str(exc.stderr)
    return proc.returncode, proc.stdout + proc.stderr


def verdict(case: Case, code: int | None, text: str, tmp: Path) -> str:
    """good / poor / bad (the module docstring). A Ctrl-C through ``deepspeed`` also prints DeepSpeed's own runner's
    KeyboardInterrupt traceback, which aligner cannot prevent: that one is not held against the case."""
    if code is None or code not in (case.code if isinstance(case.code, tuple) else (case.code,)):
        return "bad"
    noise = [t for t in re.split(r"(?=Traceback \(most recent call last\))", text)[1:]
             if not (case.tool == "ctrl_c" and "deepspeed/launcher/runner.py" in t[:2000])]
    if case.says.format(tmp=tmp) not in text or noise or "terminate called" in text:
        return "poor"
    return "good"


def message(text: str) -> str:
    """The line that tells the user the outcome (from its ``aligner: error:``-style start, after any progress bar)."""
    found = re.search(r"(aligner|eval|aligner-estimate): (error|stopped)[^\n]*|aligner: stopped after[^\n]*|"
                      r"[\w.-]+: error:[^\n]*", text)
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return (found.group(0) if found else lines[-1] if lines else "").split("\r")[-1].strip()[:220]


def main(argv: list[str] | None = None) -> int:
    from results_md import command_line, write_section

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", help="comma-separated groups or case names, or 'here' (the cases CI does not run); "
                                  "default: all")
    p.add_argument("--no-write", action="store_true", help="print the table only (default: also into RESULTS.md)")
    p.add_argument("--timeout", type=float, default=900, help="seconds before a case counts as a hang (the 2-core "
                                                                  "machine under other sessions' load needs minutes)")
    p.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "RESULTS.md")
    args = p.parse_args(argv)
    wanted = {w.strip() for w in (args.only or "").split(",") if w.strip()}
    cases = [c for c in CASES if not wanted or c.group in wanted or c.name in wanted
             or ("here" in wanted and c.stage is None)]
    table = ["| # | group | case | exit (expected) | message | verdict | wall s | CI |", "|---|---|---|---|---|---|---|---|"]
    counts = {"good": 0, "poor": 0, "bad": 0}
    loads = []
    for i, case in enumerate(cases, 1):
        loads.append(os.getloadavg()[0])
        with tempfile.TemporaryDirectory(prefix="sweep-") as tmp:
            started = time.perf_counter()
            code, text = run_case(case, Path(tmp), args.timeout)
            wall = time.perf_counter() - started
            judged = verdict(case, code, text, Path(tmp))
            said = message(text).replace(tmp, "<tmp>").replace("|", "\\|")
        counts[judged] += 1
        expected = " or ".join(map(str, case.code)) if isinstance(case.code, tuple) else case.code
        table.append(f"| {i} | {case.group} | {case.name} | {code} ({expected}) | `{said}` | {judged} | "
                     f"{wall:.0f} | {'in-process' if case.stage else 'here only'} |")
        print(table[-1], flush=True)
    summary = (f"{len(cases)} cases: {counts['good']} good, {counts['poor']} poor, {counts['bad']} bad "
               f"(1-min load average {min(loads):.1f}-{max(loads):.1f}, 2 cores).")
    print(summary)
    if not args.no_write:
        write_section(args.results, "bad_input_sweep", "\n".join([f"Command: `{command_line(__file__, argv)}`", "",
                                                                   summary, "", *table]))
    return 0 if counts["good"] == len(cases) else 1


if __name__ == "__main__":
    sys.exit(main())
