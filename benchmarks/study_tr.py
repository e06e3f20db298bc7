"""Does the trust region help, and at which α and τ? Gold reward against KL on the embedded sort task.

The TR paper ("Learn Your Reference Model for Real Good Alignment", Gorbatovski et al. 2024) reports that
updating the reference (TR-DPO, TR-IPO, TR-KTO; AlpacaEval 2 gains quoted in DESIGN.md) keeps quality
higher at the same divergence from the SFT model and lets the policy go farther from it. The embedded sort
task has a known gold reward (:func:`aligner.data.synthetic.gold_reward`), so the claims can be checked on
curves of gold reward against KL(π_θ ‖ π_SFT), the overoptimization curves of Gao et al. 2023 and Rafailov
et al. 2024. The study needs a baseline that first improves on the SFT model, then overoptimizes: it
trains on pairs of the SFT model's own samples ranked by the gold reward (``study_tr_task.py`` says why
the embedded pairs cannot show that curve).

Stages (``--stage all`` runs them in order; each later stage reads what the earlier ones found):

1. ``dpo``: plain DPO at each ``--betas`` value, ``--seeds`` seeds. The β with the higher best gold is "the
   best DPO setting".
2. ``screen``: at that β, tr_soft α ∈ ``--alphas`` × τ ∈ ``--tau-fractions`` of the run, and tr_hard at the
   same τ, ``--screen-seeds`` seeds each (a screening pass: it picks, it does not enter a verdict).
3. ``confirm``: the best tr_soft cell and the best tr_hard cell of the screen (highest best gold) at
   ``--seeds`` fresh seeds (seeds not used to pick them).
4. ``losses``: IPO, KTO, and each with the better of the two screened TR settings, ``--seeds`` seeds, with
   DPO's lr, run length and β (IPO's β is its own: see ``--ipo-beta``). It needs only the screen, so it can
   run beside ``confirm`` from a second invocation (``--stage confirm`` and ``--stage losses``).
5. ``report`` (always last): ``study_tr.csv``, the tables, the verdicts, the figures and the RESULTS.md section.

Each run trains through the real trainer (``launch/train.py``), as one process (one rank: a ZeRO-3
engine with world size 1, no launcher) to fit the study on a shared 2-core machine; it saves a checkpoint
every ``--steps / --checkpoints`` steps. Every checkpoint is scored on ``--prompts`` held-out prompts: the
gold reward of one sample per prompt at temperature 1 (``gold``, the policy's expected gold reward, the
quantity a KL-regularized objective trades against KL), of the greedy response (``gold_greedy``), and
KL(π_θ ‖ π_SFT) on the sampled responses, summed over their tokens of the exact per-token KL over the
vocabulary (an unbiased, non-negative estimate of the sequence KL). A run's scores go to
``<out>/runs/<run>/scores.json`` and its checkpoints are deleted; a rerun skips every run whose scores
exist, so the study can be completed in pieces.

    python benchmarks/study_tr.py                       # the whole study (hours on 2 cores)
    python benchmarks/study_tr.py --stage dpo,screen    # some stages
    python benchmarks/study_tr.py --stage report        # tables and verdicts from what has finished
    python benchmarks/study_tr.py --smoke --out /tmp/s  # what CI runs: 2 steps, 1 seed, a few prompts

Everything is seeded (pairs, data order, sampling), so a rerun on CPU reproduces the scores.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # results_md, study_stats, beside this script
from results_md import command_line, write_section  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

import study_stats as stats  # noqa: E402
import study_tr_task as task  # noqa: E402
from aligner.data import embedded  # noqa: E402
from aligner.data import collate_pairs  # noqa: E402
from aligner.data.synthetic import sft_rows  # noqa: E402
from aligner.data.tokenize import Example  # noqa: E402
from aligner.evaluation.generate import generate  # noqa: E402
from aligner.registry import available_plugins  # noqa: E402

RESULTS = ROOT / "benchmarks" / "RESULTS.md"
EVAL_PROMPT_SEED = 987654  # held-out prompts: the SFT warm-up and the training pairs use other seeds
STAGES = ("dpo", "screen", "confirm", "losses")
METRICS = ("gold", "gold_greedy", "kl")


# -- what one run is ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Cell:
    """One setting of the sweep: a loss at a β, with or without a reference update (α, τ in steps)."""

    loss: str
    beta: float
    method: str = "none"  # none, tr_soft or tr_hard
    alpha: float | None = None
    tau: int | None = None

    @property
    def name(self) -> str:
        base = f"{self.loss}-b{self.beta:g}"
        if self.method == "tr_soft":
            return f"{base}+tr_soft-a{self.alpha:g}-t{self.tau}"
        if self.method == "tr_hard":
            return f"{base}+tr_hard-t{self.tau}"
        return base

    @property
    def family(self) -> str:
        return self.loss

    def plugins(self) -> str:
        return self.loss if self.method == "none" else f"{self.loss},{self.method}"

    def sets(self) -> list[str]:
        out = [f"{self.loss}.beta={self.beta}"]
        if self.method == "tr_soft":
            out += [f"tr_soft.alpha={self.alpha}", f"tr_soft.every={self.tau}"]
        elif self.method == "tr_hard":
            out.append(f"tr_hard.every={self.tau}")
        return out

    def with_update(self, other: "Cell") -> "Cell":
        """This loss with ``other``'s reference update."""
        return Cell(self.loss, self.beta, other.method, other.alpha, other.tau)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stage", default="all",
                   help=f"comma-separated stages to run, of: {', '.join(STAGES)}; 'all' (default) runs them all, "
                        f"'report' none (the report is always written)")
    p.add_argument("--seeds", type=int, default=5, help="seeds of every cell that enters a verdict")
    p.add_argument("--screen-seeds", type=int, default=2, help="seeds of the tr_soft/tr_hard screening pass")
    p.add_argument("--steps", type=int, default=240, help="run length T (optimizer steps)")
    p.add_argument("--checkpoints", type=int, default=8, help="checkpoints scored per run (every T/checkpoints steps)")
    p.add_argument("--lr", type=float, default=3e-5)
    p.add_argument("--betas", default="0.05,0.1", help="DPO's β values (and KTO's)")
    p.add_argument("--ipo-beta", type=float, default=0.1,
                   help="IPO's β (its log-ratios are per-token means and its target is 1/(2β): not DPO's scale)")
    p.add_argument("--alphas", default="0.1,0.3,0.6,0.9", help="tr_soft.alpha values of the screen")
    p.add_argument("--tau-fractions", default="1/32,1/8,1/2", help="τ as fractions of the run length")
    p.add_argument("--prompts", type=int, default=384, help="held-out prompts scored per checkpoint")
    p.add_argument("--pair-prompts", type=int, default=3072, help="prompts of the training pairs (study_tr_task.py)")
    p.add_argument("--jobs", type=int, default=2, help="runs trained at once")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "study_tr"))
    p.add_argument("--smoke", action="store_true",
                   help="2 steps, 1 seed, 1 α, 1 τ, few prompts and pairs; writes no RESULTS.md section")
    args = p.parse_args(argv)
    args.stages = STAGES if args.stage == "all" else tuple(s for s in args.stage.split(",") if s and s != "report")
    unknown = [s for s in args.stages if s not in STAGES]
    if unknown:
        p.error(f"--stage: unknown stage {unknown[0]!r}; choose from {', '.join(STAGES)}, all or report")
    args.betas = [float(b) for b in args.betas.split(",") if b]
    args.alphas = [float(a) for a in args.alphas.split(",") if a]
    try:
        fractions = [parse_fraction(f) for f in args.tau_fractions.split(",") if f]
    except (ValueError, ZeroDivisionError) as exc:
        p.error(f"--tau-fractions {args.tau_fractions!r}: {exc}; give fractions of the run such as 1/32,1/8,1/2")
    if args.smoke:
        args.seeds, args.screen_seeds, args.steps, args.checkpoints, args.prompts = 1, 1, 2, 2, 8
        args.betas, args.alphas, fractions, args.pair_prompts, args.jobs = args.betas[:1], [0.6], [1 / 2], 64, 1
    args.taus = sorted({max(1, round(f * args.steps)) for f in fractions})
    if args.steps % args.checkpoints:
        p.error(f"--steps {args.steps} is not a multiple of --checkpoints {args.checkpoints}")
    return args


def parse_fraction(text: str) -> float:
    num, _, den = text.partition("/")
    value = float(num) / float(den or 1)
    if not 0 < value <= 1:
        raise ValueError(f"{text} is not in (0, 1]")
    return value


# -- training and scoring one run -----------------------------------------------------------------------------
def train(cell: Cell, seed: int, args: argparse.Namespace, run_dir: Path, pairs: Path) -> None:
    """``launch/train.py`` as one process (one rank), checkpoints every T / --checkpoints steps."""
    sets = [f"output_dir={run_dir}", f"train.max_steps={args.steps}", f"train.save_every={args.steps // args.checkpoints}",
            f"train.seed={seed}", f"train.lr={args.lr}", f"data.train={pairs}", "data.eval=null", *cell.sets()]
    if args.smoke:  # 2 steps: the static pre-pass would cost more than the steps
        sets.append("train.cache_static_logps=false")
    cmd = [sys.executable, str(ROOT / "launch" / "train.py"), "--config", str(ROOT / "configs" / "tiny-cpu.yaml"),
           "--plugins", cell.plugins(), "--overwrite", "--set", *sets]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("RANK", None)  # one rank of its own, whatever launched this script
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"training failed: {shlex.join(cmd)}\n{proc.stderr[-3000:]}")


def load_checkpoint(sft_dir: Path, checkpoint_dir: Path):
    """The policy of a DeepSpeed ZeRO checkpoint as a plain HF model (fp32 weights merged from the shards)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(sft_dir)
    state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir.parent), tag=checkpoint_dir.name)
    model.load_state_dict(state, strict=True)
    return model.eval()


def sampled_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    """The token ids of sampled responses: the text's tokens, plus EOS when the sample stopped before the limit.

    The tokenizer is byte-level, so the text round-trips to the sampled ids; a sample shorter than
    ``MAX_NEW_TOKENS`` tokens ended with EOS (the longest answer is 13 tokens).
    """
    out = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        out.append(ids + [tokenizer.eos_token_id] if len(ids) < task.MAX_NEW_TOKENS else ids)
    return out


@torch.no_grad()
def token_kl(model, sft_model, tokenizer, prompts: list[str], responses: list[list[int]]) -> np.ndarray:
    """Σ_t KL(π_θ(·|x, y_<t) ‖ π_SFT(·|x, y_<t)) over each response's tokens, per response (N,)."""
    examples = [Example(str(i), tokenizer(p)["input_ids"], r, r) for i, (p, r) in enumerate(zip(prompts, responses))]
    batch = collate_pairs(examples, tokenizer.pad_token_id)
    positions, _, owner = batch.score_index()  # (M,) flat positions in (2N·T), owner: which sequence
    inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
    logp = torch.log_softmax(model(**inputs).logits.flatten(0, 1)[positions].double(), -1)  # (M, V)
    logq = torch.log_softmax(sft_model(**inputs).logits.flatten(0, 1)[positions].double(), -1)
    per_token = (logp.exp() * (logp - logq)).sum(-1)  # (M,)
    summed = torch.zeros(2 * len(prompts), dtype=torch.float64).index_add(0, owner, per_token)
    return summed[: len(prompts)].numpy()  # chosen half = the responses (rejected half is the same copy)


def score(model, sft_model, tokenizer, prompts: list[str], seed: int) -> dict[str, float]:
    """Gold reward of greedy and of sampled responses, and KL(π_θ ‖ π_SFT) on the sampled ones."""
    from aligner.data.synthetic import gold_reward

    greedy = generate(model, tokenizer, prompts, task.MAX_NEW_TOKENS)
    sampled = generate(model, tokenizer, prompts, task.MAX_NEW_TOKENS, temperature=1.0, seed=seed)
    kl = token_kl(model, sft_model, tokenizer, prompts, sampled_ids(tokenizer, sampled))
    return {"gold": float(np.mean([gold_reward(p, r) for p, r in zip(prompts, sampled)])),
            "gold_greedy": float(np.mean([gold_reward(p, r) for p, r in zip(prompts, greedy)])),
            "kl": float(kl.mean())}


class Study:
    """The SFT model, the prompts, the training pairs and the finished runs of one output folder."""

    def __init__(self, args: argparse.Namespace) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.set_num_threads(1)  # the scoring threads share the machine with the training processes
        self.args, self.out = args, Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.sft_dir = embedded.ensure_embedded_model("embedded:tiny-sort")
        self.tokenizer = AutoTokenizer.from_pretrained(self.sft_dir)
        self.sft = AutoModelForCausalLM.from_pretrained(self.sft_dir).eval()
        self.prompts = [p for p, _ in sft_rows(args.prompts, seed=EVAL_PROMPT_SEED)]
        self.pairs = task.ensure_pairs(self.out, self.sft, self.tokenizer, args.pair_prompts)
        self.started = time.time()

    def run_dir(self, cell: Cell, seed: int) -> Path:
        return self.out / "runs" / f"{cell.name}-s{seed}"

    def signature(self, cell: Cell, seed: int) -> dict:
        """What a finished run must match to be reused: the cell and every setting that changes its scores."""
        a = self.args
        return {"cell": asdict(cell), "seed": seed, "steps": a.steps, "checkpoints": a.checkpoints, "lr": a.lr,
                "prompts": a.prompts, "pairs": self.pairs.name}

    def finished(self, cell: Cell, seed: int) -> dict | None:
        path = self.run_dir(cell, seed) / "scores.json"
        if not path.is_file():
            return None
        done = json.loads(path.read_text())
        return done if done.get("signature") == self.signature(cell, seed) else None

    def run(self, cell: Cell, seed: int) -> dict:
        """Train and score one run, or read its scores when a previous invocation finished it."""
        done = self.finished(cell, seed)
        if done is not None:
            return done
        run_dir = self.run_dir(cell, seed)
        t0 = time.time()
        train(cell, seed, self.args, run_dir, self.pairs)
        trained_s = time.time() - t0
        sample_seed = 10_000 + seed
        rows = [{"step": 0, **score(self.sft, self.sft, self.tokenizer, self.prompts, sample_seed)}]
        ckpts = sorted((run_dir / "checkpoints").glob("step_*"), key=lambda p: int(p.name.split("_")[1]))
        for ckpt in ckpts:
            model = load_checkpoint(self.sft_dir, ckpt)
            rows.append({"step": int(ckpt.name.split("_")[1]),
                         **score(model, self.sft, self.tokenizer, self.prompts, sample_seed)})
        done = {"signature": self.signature(cell, seed), "rows": rows, "train_s": round(trained_s, 1),
                "total_s": round(time.time() - t0, 1)}
        for leftover in ("checkpoints", "final", "tensorboard", "static_logps"):
            shutil.rmtree(run_dir / leftover, ignore_errors=True)  # 2 MiB a checkpoint; the scores are what is kept
        (run_dir / "scores.json").write_text(json.dumps(done, indent=1))
        print(f"{cell.name} seed {seed}: {done['total_s']:.0f} s (train {trained_s:.0f} s); "
              f"{time.time() - self.started:.0f} s into this invocation", flush=True)
        return done

    def run_all(self, cells: list[Cell], seeds: list[int]) -> None:
        jobs = [(c, s) for c in cells for s in seeds]
        with ThreadPoolExecutor(max_workers=self.args.jobs) as pool:
            list(pool.map(lambda cs: self.run(*cs), jobs))

    def results(self, cell: Cell, seeds: list[int]) -> "CellResult | None":
        """The cell's finished runs among ``seeds``; None unless all of them finished."""
        done = [self.finished(cell, s) for s in seeds]
        if any(d is None for d in done):
            return None
        return CellResult(cell, seeds, [d["rows"] for d in done], [d["total_s"] for d in done])


# -- what the runs say ----------------------------------------------------------------------------------------
class CellResult:
    """A cell's runs as arrays (seed × checkpoint) and its statistics with bootstrap intervals over seeds."""

    def __init__(self, cell: Cell, seeds: list[int], runs: list[list[dict]], seconds: list[float]) -> None:
        self.cell, self.seeds, self.seconds = cell, seeds, seconds
        self.steps = np.array([r["step"] for r in runs[0]])
        self.m = {k: np.array([[r[k] for r in rows] for rows in runs]) for k in METRICS}  # (seeds, checkpoints)

    @property
    def n(self) -> int:
        return len(self.seeds)

    def best(self, metric: str = "gold") -> tuple[float, float, float]:
        """Peak over checkpoints of the seed-mean curve (the resamples re-pick the peak: selection included)."""
        return stats.bootstrap(lambda runs: float(runs.mean(0).max()), self.m[metric])

    def best_step(self, metric: str = "gold") -> int:
        return int(self.steps[int(self.m[metric].mean(0).argmax())])

    def at_kl(self, target: float, metric: str = "gold") -> np.ndarray:
        """Per seed, the metric where the run's path first reaches KL = target (linear between checkpoints); NaN
        for a run that never gets there."""
        out = np.full(self.n, np.nan)
        for i in range(self.n):
            kl, y = self.m["kl"][i], self.m[metric][i]
            for j in range(len(kl) - 1):
                if kl[j] <= target <= kl[j + 1] and kl[j + 1] > kl[j]:
                    out[i] = y[j] + (y[j + 1] - y[j]) * (target - kl[j]) / (kl[j + 1] - kl[j])
                    break
        return out

    def reach(self) -> float:
        """The KL every seed's path reaches (the smallest of the seeds' largest KL)."""
        return float(np.maximum.accumulate(self.m["kl"], axis=1)[:, -1].min())

    def final_minus_sft(self, metric: str = "gold") -> np.ndarray:
        return self.m[metric][:, -1] - self.m[metric][:, 0]


def mean_all(runs: np.ndarray) -> float:
    """Mean over seeds, undefined (NaN) if any seed is: a matched-KL point every run reached."""
    return float(runs.mean()) if np.isfinite(runs).all() else float("nan")


def matched_levels(results: list[CellResult]) -> list[float]:
    """Three KL levels every compared run reaches: 1/4, 1/2 and all of the smallest reach."""
    k = min(r.reach() for r in results)
    return [k / 4, k / 2, k]


def diff_at(a: CellResult, b: CellResult, k: float, metric: str = "gold") -> tuple[float, float, float]:
    return stats.bootstrap_diff(mean_all, a.at_kl(k, metric), b.at_kl(k, metric))


def diff_best(a: CellResult, b: CellResult, metric: str = "gold") -> tuple[float, float, float]:
    peak = lambda runs: float(runs.mean(0).max())  # noqa: E731
    return stats.bootstrap_diff(peak, a.m[metric], b.m[metric])


def matched_claim(a: CellResult, b: CellResult, levels: list[float]) -> tuple[str, list[tuple[float, float, float]]]:
    """Claim 1 for one TR cell: supported when some level's interval is above 0 and none is below;
    refuted when some is below and none above; mixed directions and all-contain-0 are not resolved."""
    diffs = [diff_at(a, b, k) for k in levels]
    above = any(lo > 0 for _, lo, _ in diffs)
    below = any(hi < 0 for _, _, hi in diffs)
    word = ("supported" if above and not below else "refuted" if below and not above else
            "not resolved at this budget (directions differ by KL level)" if above else "not resolved at this budget")
    return word, diffs


# -- the stages -----------------------------------------------------------------------------------------------
def verdict_seeds(args: argparse.Namespace) -> list[int]:
    return list(range(args.seeds))


def fresh_seeds(args: argparse.Namespace) -> list[int]:
    """Seeds for confirming a screened cell: none of those that picked it."""
    return list(range(args.screen_seeds, args.screen_seeds + args.seeds))


def dpo_cells(args: argparse.Namespace) -> list[Cell]:
    return [Cell("dpo", b) for b in args.betas]


def pick(study: Study, cells: list[Cell], seeds: list[int]) -> CellResult | None:
    """The cell with the highest best gold; None until every cell's runs finished (no pick from part of a stage)."""
    done = [study.results(c, seeds) for c in cells]
    return None if any(r is None for r in done) else max(done, key=lambda r: r.best()[0])


def screen_cells(args: argparse.Namespace, base: Cell) -> tuple[list[Cell], list[Cell]]:
    soft = [Cell(base.loss, base.beta, "tr_soft", a, t) for a in args.alphas for t in args.taus]
    hard = [Cell(base.loss, base.beta, "tr_hard", None, t) for t in args.taus]
    return soft, hard


def loss_cells(args: argparse.Namespace, dpo: Cell) -> list[Cell]:
    """IPO (its own β, --ipo-beta) and KTO (DPO's best β: the same scale of the summed log-ratio), no TR."""
    return [Cell("ipo", args.ipo_beta), Cell("kto", dpo.beta)]


def plan(study: Study) -> dict:
    """Run the stages of ``--stage`` and return what was decided: the best DPO cell, the screened picks, and the
    TR setting that IPO and KTO get (the better of the two picks, by the screen's best gold).

    The ``losses`` stage needs only the screen, so it can run beside ``confirm`` (from another invocation);
    its plain IPO and KTO runs need only DPO's β, so they run as soon as the dpo stage has finished.
    """
    args = study.args
    stages = args.stages
    if "dpo" in stages:
        study.run_all(dpo_cells(args), verdict_seeds(args))
    decided: dict = {"dpo": pick(study, dpo_cells(args), verdict_seeds(args))}
    if decided["dpo"] is None:
        return decided
    others = loss_cells(args, decided["dpo"].cell)
    soft, hard = screen_cells(args, decided["dpo"].cell)
    if "screen" in stages:
        study.run_all(soft + hard, list(range(args.screen_seeds)))
    decided["soft"] = pick(study, soft, list(range(args.screen_seeds)))
    decided["hard"] = pick(study, hard, list(range(args.screen_seeds)))
    if decided["soft"] is None or decided["hard"] is None:
        if "losses" in stages:
            study.run_all(others, verdict_seeds(args))
        return decided
    decided["tr"] = max(decided["soft"], decided["hard"], key=lambda r: r.best()[0]).cell
    if "confirm" in stages:
        study.run_all([decided["soft"].cell, decided["hard"].cell], fresh_seeds(args))
    if "losses" in stages:
        study.run_all(others + [c.with_update(decided["tr"]) for c in others], verdict_seeds(args))
    return decided


# -- the report -----------------------------------------------------------------------------------------------
def collect(study: Study, decided: dict) -> dict[str, list[CellResult]]:
    """Every finished cell, by role: dpo (both β), screen, confirmed (the picks at fresh seeds), losses."""
    args = study.args
    out: dict[str, list[CellResult]] = {"dpo": [], "screen": [], "confirmed": [], "losses": []}
    out["dpo"] = [r for c in dpo_cells(args) if (r := study.results(c, verdict_seeds(args))) is not None]
    if decided.get("dpo") is None:
        return out
    soft, hard = screen_cells(args, decided["dpo"].cell)
    out["screen"] = [r for c in soft + hard if (r := study.results(c, list(range(args.screen_seeds)))) is not None]
    for key in ("soft", "hard"):
        if decided.get(key) is not None and (r := study.results(decided[key].cell, fresh_seeds(args))) is not None:
            out["confirmed"].append(r)
    if decided.get("tr") is not None:
        for c in loss_cells(args, decided["dpo"].cell):
            for cell in (c, c.with_update(decided["tr"])):
                if (r := study.results(cell, verdict_seeds(args))) is not None:
                    out["losses"].append(r)
    return out


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def tau_text(tau: int | None, steps: int) -> str:
    return "" if tau is None else f"{tau} (T/{steps / tau:.3g})"


def cell_table(results: list[CellResult], steps: int) -> str:
    """Per cell: the best gold and how far it rises above the SFT model (step 0 of the same runs), where it ends."""
    lines = ["| run | seeds | best gold [95% CI] (step) | best − SFT [95% CI] | last − SFT [95% CI] | last KL | "
             "best greedy gold | s per run |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        rise = stats.bootstrap(lambda runs: float(runs.mean(0).max() - runs[:, 0].mean()), r.m["gold"])
        drop = stats.bootstrap(lambda runs: float(runs.mean()), r.final_minus_sft())
        lines.append(f"| {r.cell.name} | {r.n} | {stats.fmt(*r.best())} ({r.best_step()}) | {stats.fmt(*rise, signed=True)} | "
                     f"{stats.fmt(*drop, signed=True)} | {r.m['kl'][:, -1].mean():.2f} | {r.best('gold_greedy')[0]:.3f} | "
                     f"{np.mean(r.seconds):.0f} |")
    return "\n".join(lines)


def screen_grid(results: list[CellResult], args: argparse.Namespace) -> str:
    """Best gold of the screen as an α × τ grid (tr_hard as α = 1)."""
    head = "| α \\ τ | " + " | ".join(tau_text(t, args.steps) for t in args.taus) + " |"
    lines = [head, "|---|" + "---|" * len(args.taus)]
    for alpha, method in [(a, "tr_soft") for a in args.alphas] + [(None, "tr_hard")]:
        cells = []
        for t in args.taus:
            r = next((r for r in results if r.cell.method == method and r.cell.alpha == alpha and r.cell.tau == t), None)
            cells.append("—" if r is None else
                         f"{r.best()[0]:.3f} / {r.m['gold'][:, -1].mean():.3f} (KL {r.m['kl'][:, -1].mean():.2f})")
        lines.append(f"| {'tr_hard (α = 1)' if method == 'tr_hard' else alpha} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def comparison_table(pairs: list[tuple[CellResult, CellResult]]) -> tuple[str, dict]:
    """TR cell against its baseline: best-gold difference, and gold differences at three matched KL levels."""
    lines = ["| TR run − baseline | best gold Δ [95% CI] | KL level | Δ gold at 1/4 | Δ gold at 1/2 | Δ gold at 1 | "
             "Δ greedy gold at 1/2 |", "|---|---|---|---|---|---|---|"]
    found = {}
    for tr, base in pairs:
        levels = matched_levels([tr, base])
        word, diffs = matched_claim(tr, base, levels)
        best = diff_best(tr, base)
        greedy = diff_at(tr, base, levels[1], "gold_greedy")
        found[tr.cell.name] = {"base": base.cell.name, "levels": levels, "matched": word, "diffs": diffs, "best": best,
                               "tr": tr, "base_result": base}
        lines.append(f"| {tr.cell.name} − {base.cell.name} | {stats.fmt(*best, signed=True)} | {levels[2]:.2f} | "
                     + " | ".join(stats.fmt(*d, signed=True) for d in diffs) + f" | {stats.fmt(*greedy, signed=True)} |")
    return "\n".join(lines), found


def verdicts(found: dict, decided: dict, dpo_best: CellResult, results: dict) -> str:
    """The paper's four claims, each worded from its intervals."""
    dpo_rows = {k: v for k, v in found.items() if v["base"] == dpo_best.cell.name}
    out = []
    if dpo_rows:
        parts = [f"{k}: {v['matched']} (Δ gold at KL {', '.join(f'{x:.2f}' for x in v['levels'])}: "
                 + ", ".join(stats.fmt(*d, signed=True) for d in v["diffs"]) + ")" for k, v in dpo_rows.items()]
        out.append("1. **At equal KL, TR ≥ the baseline** (DPO, β = "
                   f"{dpo_best.cell.beta:g}). " + "; ".join(parts) + ".")
        parts = [f"{k}: {stats.claim_word(*v['best'][1:])} (Δ best gold {stats.fmt(*v['best'], signed=True)})" for k, v in dpo_rows.items()]
        out.append("2. **TR reaches a higher best gold.** " + "; ".join(parts) + ".")
    else:
        out.append("1.–2. Not run yet: the confirmed TR cells are missing.")
    loss_rows = {k: v for k, v in found.items() if v["base"] != dpo_best.cell.name}
    if len(loss_rows) == 2:
        words = [stats.claim_word(*v["best"][1:]) for v in loss_rows.values()]
        overall = ("supported" if all(w == "supported" for w in words) else "refuted" if "refuted" in words
                   else "not resolved at this budget")
        parts = [f"{k}: best gold {stats.claim_word(*v['best'][1:])} (Δ {stats.fmt(*v['best'], signed=True)}), equal KL {v['matched']}"
                 for k, v in loss_rows.items()]
        out.append(f"3. **The gain holds for IPO and KTO: {overall}.** " + "; ".join(parts) + ".")
    else:
        out.append("3. **The gain holds for IPO and KTO:** not run yet (stage `losses`).")
    far = []
    for k, v in dpo_rows.items():
        tr = v["tr"]
        d = stats.bootstrap(lambda runs: float(runs.mean()), tr.final_minus_sft())
        far.append(f"{k} ends at KL {tr.m['kl'][:, -1].mean():.2f} (DPO: {dpo_best.m['kl'][:, -1].mean():.2f}) with gold − "
                   f"SFT's {stats.fmt(*d, signed=True)}: {stats.claim_word(*d[1:])}")
    if far:
        d = stats.bootstrap(lambda runs: float(runs.mean()), dpo_best.final_minus_sft())
        out.append("4. **Quality holds far from the initial reference** (gold at the run's last, farthest checkpoint "
                   "above the SFT model's). " + "; ".join(far) + f". For contrast, DPO's own last checkpoint: {stats.fmt(*d, signed=True)}.")
    return "\n".join(out)


def recommendation(confirmed: list[CellResult], screen: list[CellResult], args: argparse.Namespace,
                   found: dict) -> str:
    """α and τ (in units of the run length T) to use with this trainer, as far as the intervals support one.

    The confirmed tr_soft pick is recommended when its gain over DPO (best gold or equal KL) is supported.
    Otherwise no TR setting is recommended over plain DPO, and the screen cell with the highest gold at the
    last checkpoint is named as the one that costs least (a screening figure, one pass)."""
    soft = next((r for r in confirmed if r.cell.method == "tr_soft"), None)
    if soft is None:
        return "No recommendation yet: the confirmed tr_soft cell is missing."
    c, v = soft.cell, found.get(soft.cell.name)
    tau = lambda cell: f"τ = T/{args.steps / cell.tau:.3g} ({cell.tau} of T = {args.steps} steps)"  # noqa: E731
    if v and (stats.claim_word(*v["best"][1:]) == "supported" or v["matched"] == "supported"):
        return (f"**Recommended:** tr_soft α = {c.alpha:g}, {tau(c)}, at DPO β = {c.beta:g}: the screen's pick, "
                f"confirmed at {soft.n} fresh seeds (best gold {stats.fmt(*soft.best())}), ahead of DPO.")
    least = max((r for r in screen if r.cell.method == "tr_soft"), key=lambda r: r.m["gold"][:, -1].mean(), default=None)
    text = (f"**Recommended:** no trust-region setting over plain DPO at this budget: the screen's pick (tr_soft "
            f"α = {c.alpha:g}, {tau(c)}) is not ahead of DPO at {soft.n} fresh seeds.")
    if least is not None:
        text += (f" If TR is used, the screen's least costly tr_soft cell (highest gold at the last checkpoint, "
                 f"{plural(least.n, 'seed')}) is α = {least.cell.alpha:g}, {tau(least.cell)}: last gold "
                 f"{least.m['gold'][:, -1].mean():.3f} at KL {least.m['kl'][:, -1].mean():.2f}.")
    return text


def write_csv(results: dict, out: Path) -> None:
    seen = set()
    with (out / "study_tr.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", "loss", "beta", "method", "alpha", "tau", "seed", "step", *METRICS])
        for group in results.values():
            for r in group:
                for i, seed in enumerate(r.seeds):
                    if (r.cell, seed) in seen:
                        continue
                    seen.add((r.cell, seed))
                    for j, step in enumerate(r.steps):
                        c = r.cell
                        w.writerow([c.name, c.loss, c.beta, c.method, c.alpha or "", c.tau or "", seed, int(step),
                                    *(round(float(r.m[k][i, j]), 6) for k in METRICS)])


def frontier(r: CellResult, grid: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean gold at each KL of ``grid`` over seeds with its bootstrap interval (NaN past the cell's reach)."""
    est, lo, hi = (np.full(len(grid), np.nan) for _ in range(3))
    for i, k in enumerate(grid):
        if k <= r.reach():
            est[i], lo[i], hi[i] = stats.bootstrap(mean_all, r.at_kl(k), seed=i)
    return est, lo, hi


def plot_screen(results: list[CellResult], args: argparse.Namespace, out: Path, plt) -> Path | None:
    """The screen's best gold over α × τ (tr_hard as the α = 1 row)."""
    rows = [(a, "tr_soft") for a in args.alphas] + [(1.0, "tr_hard")]
    grid = np.full((len(rows), len(args.taus)), np.nan)
    for r in results:
        i = rows.index((r.cell.alpha if r.cell.method == "tr_soft" else 1.0, r.cell.method))
        grid[i, args.taus.index(r.cell.tau)] = r.best()[0]
    if not np.isfinite(grid).any():
        return None
    fig, ax = plt.subplots(figsize=(5.5, 4))
    im = stats.heatmap(ax, grid, [tau_text(t, args.steps) for t in args.taus],
                       [f"{a:g}" if m == "tr_soft" else "tr_hard" for a, m in rows], "τ (steps)", "tr_soft α",
                       f"screen: best gold of samples ({plural(args.screen_seeds, 'seed')})")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    path = out / "screen.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot(results: dict, out: Path, args: argparse.Namespace) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots (pip install -e .[report])")
        return []
    panels = [("DPO and its confirmed TR settings", results["dpo"] + results["confirmed"])]
    panels += [(f"{loss.upper()} and TR-{loss.upper()}", [r for r in results["losses"] if r.cell.loss == loss])
               for loss in ("ipo", "kto")]
    panels = [(t, rs) for t, rs in panels if rs]
    paths = []
    if panels:
        fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
        for ax, (title, rs) in zip(axes[0], panels):
            for r in rs:
                grid = np.linspace(0, r.reach(), 24)
                est, lo, hi = frontier(r, grid)
                ax.plot(grid, est, label=f"{r.cell.name} ({r.n} seeds)")
                ax.fill_between(grid, lo, hi, alpha=0.2)
            ax.axhline(float(rs[0].m["gold"][:, 0].mean()), color="grey", ls=":", lw=1, label="SFT model")
            ax.set_xlabel("KL(π_θ ‖ π_SFT), nats per response")
            ax.set_ylabel("gold reward of samples (mean, 95% CI over seeds)")
            ax.set_title(title, fontsize=10)
            ax.legend(fontsize=7)
        fig.tight_layout()
        paths.append(out / "gold_vs_kl.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
        fig, ax = plt.subplots(figsize=(6, 4))
        for r in results["dpo"] + results["confirmed"]:
            ax.plot(r.steps, r.m["gold"].mean(0), marker="o", ms=3, label=f"{r.cell.name}")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("gold reward of samples (seed mean)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        paths.append(out / "gold_vs_step.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    if results["screen"] and (path := plot_screen(results["screen"], args, out, plt)) is not None:
        paths.append(path)
    return paths


def report(study: Study, decided: dict, command: str, rerun: str, wall_s: float) -> str:
    args, results = study.args, collect(study, decided)
    write_csv(results, study.out)
    written_by = f" (this section written by `{command}`)" if command != rerun else ""
    counted = {(r.cell, seed): sec for group in results.values() for r in group for seed, sec in zip(r.seeds, r.seconds)}
    n_runs, run_s = len(counted), sum(counted.values())
    text = [f"Command: `{rerun}`{written_by}. Run length T = {args.steps} steps, lr {args.lr:g}, 8 pairs per step, 1 rank "
            f"(`launch/train.py` without a launcher: a ZeRO-3 engine with world size 1), a checkpoint every "
            f"{args.steps // args.checkpoints} steps, {args.prompts} held-out prompts per checkpoint; training pairs: "
            f"`{study.pairs.name}` (study_tr_task.py). Verdict cells: {args.seeds} seeds; screen: {plural(args.screen_seeds, 'seed')}"
            f"; the screen's picks are rerun at seeds {fresh_seeds(args)[0]}–{fresh_seeds(args)[-1]}, not the "
            f"ones that picked them. Wall time of this invocation: {wall_s:.0f} s; the {n_runs} runs below took "
            f"{run_s:.0f} s (training and scoring), counted one by one."]
    if not results["dpo"]:
        return "\n\n".join(text + ["Nothing finished yet."])
    text.append("**DPO, both β** (gold = mean gold reward of one sample per prompt at temperature 1; step 0 is the "
                "SFT model):\n\n" + cell_table(results["dpo"], args.steps))
    if decided.get("dpo") is None:
        return "\n\n".join(text + ["**Not finished:** " + remaining(study, decided, rerun)])
    if results["screen"]:
        text.append(f"**Screen** (β = {decided['dpo'].cell.beta:g}, {plural(args.screen_seeds, 'seed')}; best gold of the "
                    f"seed-mean curve / gold at the last checkpoint (its KL); the pick is by best gold):\n\n" + screen_grid(results["screen"], args))
    pairs = [(r, decided["dpo"]) for r in results["confirmed"]]
    for loss in ("ipo", "kto"):
        rs = [r for r in results["losses"] if r.cell.loss == loss]
        base = next((r for r in rs if r.cell.method == "none"), None)
        pairs += [(r, base) for r in rs if r.cell.method != "none" and base is not None]
    found = {}
    if results["confirmed"] or results["losses"]:
        text.append("**Verdict cells** (fresh seeds for the confirmed TR picks):\n\n"
                    + cell_table(results["confirmed"] + results["losses"], args.steps))
    if pairs:
        table, found = comparison_table(pairs)
        text.append("**TR against its baseline** (differences of seed means, 95% bootstrap CI over seeds; the KL levels "
                    "are 1/4, 1/2 and all of the KL both cells' runs reach):\n\n" + table)
    text.append("**Verdicts** (supported / refuted only when the interval excludes 0):\n\n"
                + verdicts(found, decided, decided["dpo"], results))
    text.append(recommendation(results["confirmed"], results["screen"], args, found))
    missing = remaining(study, decided, rerun)
    text.append("**Not finished:** " + missing if missing else "**Complete:** every stage finished.")
    for p in plot(results, study.out, args):
        text.append(f"![{p.stem}]({p.relative_to(RESULTS.parent)})" if p.is_relative_to(RESULTS.parent) else str(p))
    return "\n\n".join(text)


def remaining(study: Study, decided: dict, rerun: str) -> str:
    """The first stage not finished, with the command that completes it and the later ones."""
    if decided.get("dpo") is None:
        first = "dpo"
    elif decided.get("soft") is None or decided.get("hard") is None:
        first = "screen"
    elif len(collect(study, decided)["confirmed"]) < 2:
        first = "confirm"
    elif len(collect(study, decided)["losses"]) < 4:
        first = "losses"
    else:
        return ""
    return f"stage {first} and the later ones; `{rerun}` finishes them (finished runs are skipped)."


def rerun_command(argv: list[str] | None) -> str:
    """This invocation's command for all stages: its options without ``--stage``."""
    args = list(sys.argv[1:] if argv is None else argv)
    keep = [a for i, a in enumerate(args) if a != "--stage" and (i == 0 or args[i - 1] != "--stage")
            and not a.startswith("--stage=")]
    return command_line(__file__, keep)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    installed = available_plugins()
    for name in ("dpo", "ipo", "kto", "tr_soft", "tr_hard"):
        if name not in installed:
            raise SystemExit(f"plugin '{name}' is not installed; installed: {', '.join(installed)}")
    started = time.time()
    study = Study(args)
    decided = plan(study)
    command = command_line(__file__, argv)
    text = report(study, decided, command, rerun_command(argv), time.time() - started)
    print(text)
    if not args.smoke:
        write_section(RESULTS, "study_tr", "## Trust-region study: does TR help, and at which α and τ? "
                      "(embedded sort task)\n\n" + text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
