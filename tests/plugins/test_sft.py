import pytest
import torch
import torch.nn.functional as F

from aligner.config import ConfigError, build_config
from aligner.hookspecs import SequenceLogps, StepInputs
from aligner.registry import activate


def test_sft_is_the_token_level_cross_entropy_of_the_chosen_tokens():
    """Independent: F.cross_entropy over every chosen token of the batch, from random logits."""
    g = torch.Generator().manual_seed(12)
    lengths = [3, 7, 1, 5]
    logits = [torch.randn(n, 11, generator=g, dtype=torch.float64) for n in lengths]
    labels = [torch.randint(0, 11, (n,), generator=g) for n in lengths]
    summed = torch.stack([-F.cross_entropy(lg, lb, reduction="sum") for lg, lb in zip(logits, labels)])  # log π(y_w)
    expected = F.cross_entropy(torch.cat(logits), torch.cat(labels))
    plugins = activate(["sft"])
    cfg = build_config({}, plugins.config_sections())
    rejected = torch.zeros(4, dtype=torch.float64)
    inputs = StepInputs(SequenceLogps(summed, rejected), None, None, torch.tensor(lengths, dtype=torch.float64), torch.ones(4))
    out = plugins.call_one("sft", "aligner_loss", inputs=inputs, config=cfg)
    assert float(out.loss) == pytest.approx(float(expected), abs=1e-12)
    assert float(out.loss) != pytest.approx(float((-summed / torch.tensor(lengths)).mean()), abs=1e-3)  # not per sequence


def test_sft_asks_for_no_reference_and_has_only_a_weight():
    plugins = activate(["sft"])
    cfg = build_config({"sft": {"weight": 0.5}}, plugins.config_sections())
    assert plugins.required_models(cfg) == set() and cfg.section("sft").weight == 0.5
    with pytest.raises(ConfigError, match=r"unknown key 'sft.beta'; the keys of 'sft' are weight"):
        build_config({"sft": {"beta": 0.1}}, plugins.config_sections())
