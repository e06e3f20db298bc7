"""Every TRL loss type at once: ONE 2-rank ZeRO-3 run with 13 weighted losses, read back from TensorBoard.

At step 1 (and in the eval before training) policy = reference, so each loss's
term `<name>/loss` is fixed by its formula; `sft`'s is the policy's own NLL,
checked against a plain Hugging Face forward of the same rows. `train/loss` is
the weighted sum of the terms.
"""

import math

import pytest
import torch

from conftest import launch, read_scalars

LN2 = math.log(2)
EXO_EPS = 1e-3
#: loss -> (weight, its term when policy = reference; None: the policy's NLL, computed below)
LOSSES = {
    "dpo": (0.5, LN2),
    "bco_pair": (0.2, 2 * LN2),
    "exo_pair": (0.3, -LN2 - 0.5 * math.log(EXO_EPS * (1 - EXO_EPS))),
    "nca_pair": (0.4, 2 * LN2),
    "sppo_hard": (0.01, 1 / (2 * 0.1 ** 2)),
    "aot": (0.6, LN2),
    "aot_unpaired": (0.7, LN2),
    "apo_zero": (0.8, 1.0),
    "apo_down": (0.9, 1.0),
    "discopop": (1.1, 0.5 * LN2 + 0.5),
    "robust": (1.2, LN2),
    "sigmoid_norm": (1.3, LN2),
    "sft": (1.0, None),
}
MICRO_BATCH = 8


@pytest.fixture(scope="module")
def mix_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("loss-mix-run")
    weights = [f"{name}.weight={w}" for name, (w, _) in LOSSES.items()]
    proc = launch(["--config", "configs/tiny-cpu.yaml", "--plugins", ",".join(LOSSES), "--set", f"output_dir={out}",
                   "train.max_steps=1", "train.save_every=0", f"train.micro_batch_size={MICRO_BATCH}",
                   "eval.batch_size=64", "robust.label_smoothing=0.1", f"exo_pair.epsilon={EXO_EPS}", *weights])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return read_scalars(out / "tensorboard")


def first_batch_nll() -> float:
    """sft's step-1 term, independently: each rank's token-level mean cross-entropy of its first micro-batch's
    chosen responses (a plain HF forward with labels), averaged over the 2 ranks."""
    from transformers import AutoModelForCausalLM

    from aligner.data import PairSampler, example_lengths, load_rows, tokenize_dataset
    from aligner.models import loading

    path = loading.resolve_path("embedded:tiny-sort", "model.name_or_path")
    tokenizer = loading.load_tokenizer(path, False)
    model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
    examples = tokenize_dataset(load_rows("embedded:train"), tokenizer, 64, None, "error", "train")
    total = 0.0
    for rank in range(2):
        batch = [examples[i] for i in next(iter(PairSampler(len(examples), MICRO_BATCH, rank, 2, 42,
                                                                     lengths=example_lengths(examples))))]
        width = max(len(ex.prompt_ids) + len(ex.chosen_ids) for ex in batch)
        ids = torch.full((len(batch), width), tokenizer.pad_token_id)
        labels = torch.full((len(batch), width), -100)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, ex in enumerate(batch):
            n = len(ex.prompt_ids) + len(ex.chosen_ids)
            ids[i, :n] = torch.tensor(ex.prompt_ids + ex.chosen_ids)
            labels[i, len(ex.prompt_ids):n] = torch.tensor(ex.chosen_ids)
            mask[i, :n] = 1
        with torch.no_grad():
            total += float(model(input_ids=ids, attention_mask=mask, labels=labels).loss) / 2
    return total


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n, (_, v) in LOSSES.items() if v is not None])
def test_each_losss_step_one_term_is_fixed_by_its_formula(mix_run, name):
    expected = LOSSES[name][1]
    step, value = mix_run[f"{name}/loss"][0]
    assert step == 1 and value == pytest.approx(expected, abs=1e-4)
    assert dict(mix_run[f"eval/{name}/loss"])[0] == pytest.approx(expected, abs=1e-4)  # eval before training


@pytest.mark.slow
def test_sft_term_is_the_policys_nll_and_train_loss_is_the_weighted_sum(mix_run):
    nll = first_batch_nll()
    step, sft = mix_run["sft/loss"][0]
    assert step == 1 and 0 < sft and sft == pytest.approx(nll, abs=1e-4)
    expected = sum(w * (nll if v is None else v) for w, v in LOSSES.values())
    assert mix_run["train/loss"][0] == (1, pytest.approx(expected, abs=1e-3))


@pytest.mark.slow
def test_rewards_and_flips_are_logged_once_by_the_core(mix_run):
    assert mix_run["rewards/margins"][0][1] == pytest.approx(0.0, abs=1e-4)
    # policy = reference: no pair changed sign, and the two "stayed" shares sum to 1
    assert mix_run["flips/correct->incorrect"][0][1] == 0.0 and mix_run["flips/incorrect->correct"][0][1] == 0.0
    stayed = mix_run["flips/correct->correct"][0][1] + mix_run["flips/incorrect->incorrect"][0][1]
    assert stayed == pytest.approx(1.0)
