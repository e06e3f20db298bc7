"""Does the trust region reduce overoptimization? Gold reward against KL on the embedded task.

The seed paper ("Learn Your Reference Model for Real Good Alignment") claims that
TR-DPO keeps sample quality higher than DPO at the same divergence from the
initial (SFT) model. The embedded sort task has a known gold reward, so this
checks the claim directly:

1. Every method (plain loss, +tr_soft, +tr_hard) trains from ``embedded:tiny-sort``
   through the real launcher (2 ZeRO-3 ranks on CPU), for several seeds, saving
   checkpoints along the way.
2. At each checkpoint the policy generates for held-out prompts, greedily and
   sampled at temperature 1; the generations are scored with the gold reward
   (:func:`aligner.data.synthetic.gold_reward`), and KL(π_θ ‖ π_SFT) is estimated
   on the sampled responses as the mean of log π_θ(y|x) − log π_SFT(y|x).
3. It writes ``study_tr.csv``, plots of gold reward against KL and against steps
   (when matplotlib is installed: ``pip install -e .[report]``), and a table in
   ``benchmarks/RESULTS.md``: best gold reward, and gold reward at matched KL.

    python benchmarks/study_tr.py                      # the default study
    python benchmarks/study_tr.py --smoke --out /tmp/s # 2 steps, 1 seed (what CI runs)

Everything is seeded (training data order, sampling), so a rerun on CPU
reproduces the CSV exactly.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # results_md, beside this script
from results_md import command_line, write_section  # noqa: E402

import torch  # noqa: E402

from aligner import embedded  # noqa: E402
from aligner.data import collate_pairs  # noqa: E402
from aligner.data.synthetic import sft_rows  # noqa: E402
from aligner.data.tokenize import Example  # noqa: E402
from aligner.generate import generate  # noqa: E402
from aligner.logps import batch_logps  # noqa: E402
from aligner.launcher import deepspeed_command  # noqa: E402
from aligner.registry import available_plugins  # noqa: E402

RESULTS = ROOT / "benchmarks" / "RESULTS.md"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--losses", default="dpo", help="comma-separated loss plugins, e.g. dpo,ipo,kto")
    p.add_argument("--methods", default="none,tr_soft,tr_hard", help="reference updates: none, tr_soft, tr_hard")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=240)
    p.add_argument("--save-every", type=int, default=40)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--alpha", type=float, default=0.6, help="tr_soft.alpha")
    p.add_argument("--soft-every", type=int, default=8, help="tr_soft.every (τ)")
    p.add_argument("--hard-every", type=int, default=32, help="tr_hard.every (τ)")
    p.add_argument("--prompts", type=int, default=128, help="held-out prompts scored per checkpoint")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--scorer", default="aligner.data.synthetic:gold_reward",
                   help="gold reward, module:function(prompt, response) -> float (default: the embedded task's scorer)")
    p.add_argument("--prompts-file", help="jsonl of held-out {'prompt': ...} rows (default: embedded-task prompts)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "study_tr"))
    p.add_argument("--smoke", action="store_true", help="2 steps, 1 seed, few prompts, τ = 1; writes no RESULTS.md section")
    args = p.parse_args(argv)
    if args.smoke:
        args.seeds, args.steps, args.save_every, args.prompts = 1, 2, 1, 8
        args.soft_every, args.hard_every = 1, 1  # so that both trust-region runs update (at step 1) within 2 steps
    return args



def train(loss: str, method: str, seed: int, args: argparse.Namespace, out_dir: Path) -> None:
    plugins = loss if method == "none" else f"{loss},{method}"
    sets = [f"output_dir={out_dir}", f"train.max_steps={args.steps}", f"train.save_every={args.save_every}",
            f"train.seed={seed}", f"train.lr={args.lr}", "data.eval=null", "--overwrite"]
    if args.smoke:  # 2 steps: a pre-pass over the whole train split would cost more than the steps themselves
        sets.append("train.cache_static_logps=false")
    if loss == "dpo":
        sets.append(f"dpo.beta={args.beta}")
    if method == "tr_soft":
        sets += [f"tr_soft.alpha={args.alpha}", f"tr_soft.every={args.soft_every}"]
    if method == "tr_hard":
        sets.append(f"tr_hard.every={args.hard_every}")
    overwrite = [s for s in sets if s.startswith("--")]
    sets = [s for s in sets if not s.startswith("--")]
    cmd = deepspeed_command(["--config", str(ROOT / "configs" / "tiny-cpu.yaml"), "--plugins", plugins, *overwrite,
                             "--set", *sets])
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
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


def response_logps(model, tokenizer, prompts: list[str], responses: list[str]) -> torch.Tensor:
    """Summed log π(y|x) of each response (its tokens plus EOS), as the trainer scores them."""
    examples = []
    for i, (p, r) in enumerate(zip(prompts, responses)):
        ids = tokenizer(r, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        examples.append(Example(str(i), tokenizer(p)["input_ids"], ids, ids))
    with torch.no_grad():
        logps, _ = batch_logps(model, collate_pairs(examples, tokenizer.pad_token_id))
    return logps.chunk(2)[0].double()


def load_scorer(target: str):
    """``module:function`` -> the function; a user's task plugs its own deterministic gold reward in here."""
    import importlib

    module_name, _, attr = target.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as exc:
        raise SystemExit(f"--scorer {target}: cannot load it ({exc}); expected module:function(prompt, response) -> float")
    return fn


def load_prompts(args: argparse.Namespace) -> list[str]:
    if not args.prompts_file:
        return [p for p, _ in sft_rows(args.prompts, seed=987654)]  # held out: the warm-up used another seed
    import json

    with open(args.prompts_file) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    bad = [i for i, r in enumerate(rows, 1) if not isinstance(r.get("prompt"), str)]
    if bad:
        raise SystemExit(f"--prompts-file {args.prompts_file}: row {bad[0]} has no string 'prompt'")
    return [r["prompt"] for r in rows[: args.prompts]]


def score(model, sft_model, tokenizer, prompts: list[str], args: argparse.Namespace, seed: int) -> dict[str, float]:
    gold_reward = load_scorer(args.scorer)
    greedy = generate(model, tokenizer, prompts, args.max_new_tokens)
    sampled = generate(model, tokenizer, prompts, args.max_new_tokens, temperature=1.0, seed=seed)
    kl = (response_logps(model, tokenizer, prompts, sampled) - response_logps(sft_model, tokenizer, prompts, sampled)).mean()
    return {
        "gold_greedy": sum(gold_reward(p, r) for p, r in zip(prompts, greedy)) / len(prompts),
        "gold_sampled": sum(gold_reward(p, r) for p, r in zip(prompts, sampled)) / len(prompts),
        "kl": float(kl),
    }


def mean_std(values: list[float]) -> tuple[float, float]:
    m = sum(values) / len(values)
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / max(1, len(values) - 1))


def curves(rows: list[dict]) -> dict[str, list[tuple[int, float, float, float, float]]]:
    """method -> [(step, mean kl, mean gold_greedy, std gold_greedy, mean gold_sampled)] over seeds."""
    out: dict[str, list] = {}
    for name in sorted({r["run"] for r in rows}):
        points = []
        for step in sorted({r["step"] for r in rows if r["run"] == name}):
            sel = [r for r in rows if r["run"] == name and r["step"] == step]
            g, gs = mean_std([r["gold_greedy"] for r in sel])
            points.append((step, mean_std([r["kl"] for r in sel])[0], g, gs, mean_std([r["gold_sampled"] for r in sel])[0]))
        out[name] = points
    return out


def at_kl(points: list[tuple], target: float) -> float | None:
    """Greedy gold reward interpolated at KL = target along a run's (kl, gold) path, first crossing."""
    for (_, k0, g0, *_), (_, k1, g1, *_) in zip(points, points[1:]):
        if min(k0, k1) <= target <= max(k0, k1) and k1 != k0:
            return g0 + (g1 - g0) * (target - k0) / (k1 - k0)
    return None


def table(rows: list[dict]) -> tuple[str, list[float]]:
    cs = curves(rows)
    max_kls = [max(p[1] for p in pts) for pts in cs.values()]
    shared = min(max_kls) if max_kls else 0.0
    targets = [shared * f for f in (0.5, 1.0)] if shared > 0 else []
    head = "| run | best greedy gold (step) | final greedy gold ± sd | final sampled gold | final KL | " + \
        " | ".join(f"gold @ KL={t:.2f}" for t in targets) + " |"
    lines = [head, "|" + "---|" * (5 + len(targets))]
    for name, pts in cs.items():
        best = max(pts, key=lambda p: p[2])
        last = pts[-1]
        cells = [f"{g:.3f}" if (g := at_kl(pts, t)) is not None else "n/a" for t in targets]
        lines.append(f"| {name} | {best[2]:.3f} ({best[0]}) | {last[2]:.3f} ± {last[3]:.3f} | {last[4]:.3f} | {last[1]:.2f} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines), targets


def verdict(rows: list[dict]) -> str:
    """What the numbers say about the paper's claim, in one paragraph, a null result included.

    For each TR run against its plain-loss run: greedy gold reward at the largest KL both
    reached, and whether the gap exceeds the seed spread (2 standard errors of the difference).
    """
    cs = curves(rows)
    sentences = []
    for name, pts in cs.items():
        if "+" not in name or name.split("+")[0] not in cs:
            continue
        base_name = name.split("+")[0]
        base = cs[base_name]
        shared = min(max(p[1] for p in pts), max(p[1] for p in base))
        tr_gold, base_gold = at_kl(pts, shared), at_kl(base, shared)
        if shared <= 0 or tr_gold is None or base_gold is None:
            sentences.append(f"{name} and {base_name} share no KL range, so they cannot be compared at matched KL.")
            continue
        n = max(1, len({r["seed"] for r in rows if r["run"] == name}))
        sd = max(pts[-1][3], base[-1][3])
        noise = 2 * sd * math.sqrt(2 / n)
        gap = tr_gold - base_gold
        judged = "higher" if gap > noise else "lower" if gap < -noise else "no different (within seed noise)"
        sentences.append(f"At KL = {shared:.2f}, {name} reaches greedy gold {tr_gold:.3f} against {base_name}'s {base_gold:.3f}: "
                         f"{judged} (gap {gap:+.3f}, noise band ±{noise:.3f} over {n} seeds).")
    return " ".join(sentences) or "No TR run to compare."


def plot(rows: list[dict], out: Path) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots (pip install -e .[report])")
        return []
    cs = curves(rows)
    paths = []
    for x_index, x_label, name in ((1, "KL(π_θ ‖ π_SFT) estimate (nats)", "gold_vs_kl.png"), (0, "optimizer step", "gold_vs_step.png")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for run, pts in cs.items():
            xs = [p[x_index] for p in pts]
            ys = [p[2] for p in pts]
            sd = [p[3] for p in pts]
            ax.plot(xs, ys, marker="o", label=run)
            ax.fill_between(xs, [y - s for y, s in zip(ys, sd)], [y + s for y, s in zip(ys, sd)], alpha=0.2)
        ax.set_xlabel(x_label)
        ax.set_ylabel("gold reward of greedy generations")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / name, dpi=120)
        plt.close(fig)
        paths.append(out / name)
    return paths




def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    installed = available_plugins()
    losses = [n for n in args.losses.split(",") if n]
    methods = [m for m in args.methods.split(",") if m]
    for name in losses + [m for m in methods if m != "none"]:
        if name not in installed:
            raise SystemExit(f"plugin '{name}' is not installed; installed: {', '.join(installed)}")
    load_scorer(args.scorer)  # fail before any training
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sft_dir = embedded.ensure_embedded_model("embedded:tiny-sort")
    tokenizer = AutoTokenizer.from_pretrained(sft_dir)
    sft_model = AutoModelForCausalLM.from_pretrained(sft_dir).eval()
    prompts = load_prompts(args)
    rows: list[dict] = []
    base = {"step": 0, **score(sft_model, sft_model, tokenizer, prompts, args, seed=0)}
    started = time.time()
    for loss in losses:
        for method in methods:
            run_name = loss if method == "none" else f"{loss}+{method}"
            for seed in range(args.seeds):
                run_dir = out / "runs" / f"{run_name}-seed{seed}"
                train(loss, method, seed, args, run_dir)
                rows.append({"run": run_name, "seed": seed, **base})
                ckpts = sorted((run_dir / "checkpoints").glob("step_*"), key=lambda p: int(p.name.split("_")[1]))
                for ckpt in ckpts:
                    model = load_checkpoint(sft_dir, ckpt)
                    rows.append({"run": run_name, "seed": seed, "step": int(ckpt.name.split("_")[1]),
                                 **score(model, sft_model, tokenizer, prompts, args, seed=seed)})
                print(f"{run_name} seed {seed}: done ({time.time() - started:.0f}s)", flush=True)
    with (out / "study_tr.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["run", "seed", "step", "kl", "gold_greedy", "gold_sampled"])
        writer.writeheader()
        for r in rows:
            writer.writerow({k: (round(v, 6) if isinstance(v, float) else v) for k, v in r.items()})
    text, _ = table(rows)
    plots = plot(rows, out)
    found = verdict(rows)
    print(text)
    print(found)
    command = command_line(__file__, argv)
    if not args.smoke:
        write_section(RESULTS, "study_tr",
            "## Trust-region study: gold reward against KL (embedded sort task)\n\n"
            f"Command: `{command.strip()}` ({args.seeds} seeds, {args.steps} steps, lr {args.lr}, β {args.beta}, "
            f"tr_soft α={args.alpha} τ={args.soft_every}, tr_hard τ={args.hard_every}; {args.prompts} held-out prompts; "
            f"{time.time() - started:.0f} s on this machine). Step 0 is the SFT model "
            f"(greedy gold {base['gold_greedy']:.3f}).\n\n" + text + "\n\n" + "**What it shows.** " + found + "\n\n"
            + "".join(f"![{p.stem}]({p.relative_to(RESULTS.parent)})\n" for p in plots if p.is_relative_to(RESULTS.parent))
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
