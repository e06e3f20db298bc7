"""train.sequence_parallel end to end: SP = 2 on 2 CPU ranks (gloo, ZeRO-3) against one rank, same global batch.

Two launches run every check below: the scenarios of tests/sequence_parallel_worker.py (DPO+SFT with prefix
sharing, the chunked head, the static cache and eval; IPO + tr_soft with plain packing, full logits and gradient
checkpointing; LoRA + tr_hard; KTO with its mismatched KL rows, padded on one rank and packed under SP), each 10
steps, on one rank and on two ranks sharing each row, plus the first scenario resumed from its
step-5 checkpoint under SP = 2.

The data is built so that the first batches hold a pair longer than one rank's share of the row, a prompt that
ends exactly on the rank boundary, a row whose first rank scores no token at all, and a row of odd length (padded
to a multiple of 2). :func:`test_the_data_hits_every_boundary_case` checks that on the real layout.

Tolerance (fp32): every logged value within 5e-5 relative + an absolute 2e-6 + 1e-7·S over the 10 steps, S being
the largest summed log-prob the run logs (``logps/*``): the rewards and KTO's KL estimate are differences of such
sums, whose fp32 resolution is about 1e-7·S (measured worst: 8e-7 on the rewards of the pair scenarios, 1.1e-5 on
``kto/kl`` with S = 194). Every parameter's gradient at step 1 within 1e-5 of the largest gradient entry
(measured: 2e-7). Only the order of summation differs (each rank sums its own part, then the parts are
all-reduced, and ZeRO-3 reduce-scatters two partial gradients instead of one), and KTO's baseline is padded.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest
import torch

from aligner.training.launcher import deepspeed_command
from conftest import ROOT, read_scalars

WORKER = ROOT / "tests" / "sequence_parallel_worker.py"
SCENARIOS = ("dpo-prefix", "tr-soft", "lora", "kto")
#: (prompt, chosen, rejected) characters of the first train pairs, two per micro-batch. The byte-level tokenizer
#: gives one token per character and appends EOS to each response, so a pair is P + (c+1) + (r+1) tokens.
SHAPED = [(40, 19, 19), (10, 4, 4),    # row 100, share 50: the first pair (80) is longer than a share
          (60, 19, 19), (6, 6, 6),     # row 120: the first prompt ends at 60, the boundary
          (70, 9, 9), (4, 2, 2),       # row 100: rank 0 holds prompt tokens only, and scores nothing
          (20, 10, 11), (15, 5, 6)]    # row 71: odd, padded by one token


def rows(shapes: list[tuple[int, int, int]], seed: int) -> list[dict]:
    rng = random.Random(seed)

    def text(n: int, letters: str) -> str:
        return "".join(rng.choice(letters) for _ in range(n))

    # chosen and rejected start with different letters, so the prompt is exactly the shared prefix
    return [{"id": f"p{i}", "prompt": text(p, "abcdefghij"), "chosen": "k" + text(c - 1, "klmnop"),
             "rejected": "q" + text(r - 1, "qrstuv")} for i, (p, c, r) in enumerate(shapes)]


def write(path, items: list[dict]):
    path.write_text("".join(json.dumps(r) + "\n" for r in items))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    rng = random.Random(0)
    extra = [(rng.randint(5, 60), rng.randint(3, 40), rng.randint(3, 40)) for _ in range(12)]
    folder = tmp_path_factory.mktemp("sp-data")
    return (write(folder / "train.jsonl", rows(SHAPED + extra, 1)),
            write(folder / "eval.jsonl", rows([(rng.randint(5, 40), rng.randint(3, 30), rng.randint(3, 30))
                                                for _ in range(6)], 2)))


@pytest.fixture(scope="module")
def kv3_model_dir(tmp_path_factory, tiny_tokenizer):
    """A tiny random Llama with 6 query and 3 key/value heads."""
    from aligner.data import embedded

    path = tmp_path_factory.mktemp("kv3-model")
    embedded.build_model(len(tiny_tokenizer), hidden_size=48, num_heads=6, num_kv_heads=3).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory, random_model_dir, kv3_model_dir, data):
    """The worker on one rank and, at the same time, on two ranks with train.sequence_parallel=2 (2 cores: the
    ranks' waits in the collectives leave room for the third process)."""
    out = tmp_path_factory.mktemp("sp-runs")
    args = [str(random_model_dir), str(data[0]), str(data[1])]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for cmd in ([sys.executable, str(WORKER), str(out / "sp1"), *args, "1"],
                         deepspeed_command([str(out / "sp2"), *args, "2", "--kv3-model", str(kv3_model_dir)], 2,
                                           WORKER))]
    logs = [proc.communicate(timeout=600)[0] for proc in procs]
    for proc, text in zip(procs, logs):
        assert proc.returncode == 0, text[-6000:]
    return out, logs[1]


def close(a: float, b: float, scale: float, rtol: float = 5e-5) -> bool:
    """Equal to fp32 resolution: ``scale`` is the run's largest summed log-prob (module doc)."""
    return abs(a - b) <= 2e-6 + 1e-7 * scale + rtol * abs(a)


def logp_scale(series: dict) -> float:
    return max(abs(v) for tag, values in series.items() if tag.startswith("logps/") for _, v in values)


def logged(folder) -> dict[str, list[tuple[int, float]]]:
    """Every scalar the run logged but speed and memory (which differ by design)."""
    return {k: v for k, v in read_scalars(folder / "tensorboard").items() if not k.startswith("perf/")}


@pytest.mark.slow
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_every_logged_value_over_10_steps_matches_one_rank(runs, scenario):
    one, two = logged(runs[0] / "sp1" / scenario), logged(runs[0] / "sp2" / scenario)
    assert sorted(one) == sorted(two)
    assert [s for s, _ in one["train/loss"]] == list(range(1, 11))
    assert [s for s, _ in one["eval/loss"]] == ([0, 5, 10] if scenario == "dpo-prefix" else [0, 10])
    scale = logp_scale(one)
    for tag, series in one.items():
        assert [s for s, _ in series] == [s for s, _ in two[tag]], tag
        bad = [(s, a, b) for (s, a), (_, b) in zip(series, two[tag]) if not close(a, b, scale)]
        assert not bad, (scenario, tag, bad)


@pytest.mark.slow
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_every_parameter_gradient_at_step_1_matches_one_rank(runs, scenario):
    one = torch.load(runs[0] / "sp1" / f"{scenario}-grads.pt")
    two = torch.load(runs[0] / "sp2" / f"{scenario}-grads.pt")
    assert one.keys() == two.keys() and len(one) > 0
    scale = max(float(g.abs().max()) for g in one.values())
    assert scale > 0
    worst = max(float((one[n] - two[n]).abs().max()) for n in one)
    assert worst <= 1e-5 * scale, (scenario, worst, scale)


@pytest.mark.slow
def test_the_moved_reference_and_the_scenarios_really_train(runs):
    """The scenarios are not trivially equal: the loss moves, and the trust-region updates happened."""
    one = logged(runs[0] / "sp1" / "tr-soft")
    assert one["tr/updates"][-1][1] == 3  # steps 3, 6, 9
    losses = [v for _, v in logged(runs[0] / "sp1" / "dpo-prefix")["dpo/loss"]]
    assert abs(losses[0] - 0.693147) < 1e-5 and max(abs(v - losses[0]) for v in losses) > 1e-3


@pytest.mark.slow
def test_a_resumed_sp_run_continues_exactly(runs):
    full, resumed = logged(runs[0] / "sp2" / "dpo-prefix"), logged(runs[0] / "sp2" / "dpo-prefix-resumed")
    assert [s for s, _ in resumed["train/loss"]] == list(range(6, 11))
    for tag, series in resumed.items():
        if tag.startswith("eval/"):
            continue
        expected = dict(full[tag])
        assert all(abs(expected[s] - v) <= 1e-6 + 1e-6 * abs(v) for s, v in series), (tag, series, full[tag])


@pytest.mark.slow
def test_the_run_logs_its_layout_and_shards_the_data_over_one_group(runs):
    logs = runs[1]
    assert "sequence parallel: 2 ranks per sequence (DeepSpeed Ulysses: 2 all-to-alls per attention layer), " \
           "1 data-parallel group" in logs
    meta = json.loads((runs[0] / "sp2" / "lora" / "checkpoints" / "step_10" / "aligner_checkpoint.json").read_text())
    assert meta["sequence_parallel"] == 2 and meta["world_size"] == 2


def test_the_data_hits_every_boundary_case(data, tiny_tokenizer):
    """On the real tokenizer, packer and sharder: the first four rows of the prefix-shared layout hold the cases
    the module docstring names (2 ranks)."""
    from aligner.data import pack_prefix_shared
    from aligner.data.tokenize import Example, tokenize_row
    from aligner.scoring.sequence_parallel import Layout, shard

    examples = []
    for i, line in enumerate(data[0].read_text().splitlines()[:8]):
        p, c, r, _ = tokenize_row(json.loads(line), tiny_tokenizer, 256, None)
        examples.append(Example(str(i), p, c, r))
    parts = []
    for b in range(4):
        batch = pack_prefix_shared(examples[2 * b:2 * b + 2])
        parts.append([shard(batch, Layout(2, r, 0, 1), tiny_tokenizer.pad_token_id) for r in (0, 1)])
    first = parts[0][0]
    assert len(examples[0].prompt_ids + examples[0].chosen_ids + examples[0].rejected_ids) > first.input_ids.shape[1]
    second = parts[1][0]
    assert len(examples[2].prompt_ids) == second.input_ids.shape[1]  # the prompt ends on the boundary
    assert parts[2][0].score_index()[0].numel() == 0 and parts[2][1].score_index()[0].numel() > 0
    assert parts[3][0].source.input_ids.shape[1] % 2 == 1 and parts[3][0].whole.input_ids.shape[1] % 2 == 0


REFUSALS = {  # bad config -> what its error must say (tests/sequence_parallel_worker.py REFUSED)
    "world": "train.sequence_parallel=3 does not divide the number of ranks (2)",
    "kv_heads": "the model has 3 key/value heads, which 2 ranks can neither split",
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_a_config_sequence_parallelism_cannot_run_is_refused_before_any_engine_on_two_ranks(runs, case):
    found = json.loads((runs[0] / "sp2" / "refusals.json").read_text())[case]
    assert found["error"] is not None and REFUSALS[case] in found["error"], found
    assert found["engines_built"] is False
