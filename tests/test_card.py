"""Model cards (aligner/publishing/card.py): Hugging Face metadata, the text, and citations read from the plugins' docstrings.

The cards of real exports are checked on the runs that wrote them: a full export in tests/test_loggers_e2e.py,
a LoRA adapter and its merged model in tests/test_lora_e2e.py.
"""

from __future__ import annotations

import importlib
import re

import pytest

from aligner.config import build_config
from aligner.publishing import card
from aligner.registry import activate, available_plugins


@pytest.mark.parametrize("plugin, expected", [
    ("dpo", [("2305.18290", "Direct Preference Optimization", "Rafailov et al.", "2023")]),
    ("tr_soft", [("2404.09656", "Learn Your Reference Model for Real Good Alignment", "Gorbatovski et al.", "2024")]),
    ("flipguard", [("2410.00508", "FlipGuard: Defending Preference Alignment against Update Regression with "
                                  "Constrained Optimization", "Zhu et al.", "2024")]),
    ("robust", [("2403.00409", "Provably Robust DPO", "Chowdhury, Kini and Natarajan", "2024")]),
    ("sft", [("2411.10442", "the generation loss of MPO", "Wang et al.", "2024"),
             ("2404.19733", "the NLL term of RPO", "Pang et al.", "2024")]),
    ("hinge", [("2305.10425", "SLiC", "Zhao et al.", "2023")]),
])
def test_citations_are_read_from_the_plugin_docstrings(plugin, expected):
    module = importlib.import_module(available_plugins()[plugin].target.partition(":")[0])
    assert [(c.arxiv_id, c.title, c.authors, c.year) for c in card.citations(module.__doc__)] == expected


def test_every_built_in_method_is_cited_with_an_id_its_docstring_gives_and_a_paper_named_for_contrast_is_not():
    for name, ap in available_plugins().items():
        doc = importlib.import_module(ap.target.partition(":")[0]).__doc__ or ""
        cited = card.citations(doc)
        assert all(c.arxiv_id in doc and c.title and c.authors for c in cited), name
        if ap.load().aligner_plugin_info().role in ("loss", "reference_update") or name == "flipguard":
            assert cited, f"{name}: its docstring cites no paper as Title (Authors, Year, arXiv:...)"
    dpo = importlib.import_module("aligner_plugins.dpo").__doc__
    assert "arXiv:2403.00409" in dpo and [c.arxiv_id for c in card.citations(dpo)] == ["2305.18290"]  # robust: "not"


def test_a_docstring_without_the_form_gives_no_citation():
    assert card.citations("A loss.\n\n    L = 0\n\n(Someone, 2020, arXiv:2001.00001) after the formula.") == []
    assert card.citations('"""X: a loss (arXiv:2001.00001)."""') == []  # no authors, no year


@pytest.fixture
def facts(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    (base / "README.md").write_text("---\nlicense: apache-2.0\nlibrary_name: transformers\n---\n# base\n")
    plugins = activate(["dpo", "tr_soft", "flipguard"], ["tensorboard"])
    cfg = build_config({"output_dir": str(tmp_path / "run"), "model": {"name_or_path": "org/base-model"},
                        "data": {"train": [{"path": "org/prefs"}, {"path": str(base / "x.jsonl")}], "eval": "org/prefs"},
                        "export": {"hub_model_id": "me/aligned"}},
                       plugins.config_sections())
    return card.card_facts(cfg, plugins, 2, base, {"train/loss": 0.5, "eval/rewards/accuracies": 0.75})


@pytest.mark.parametrize("lora, merged", [(False, False), (True, True)], ids=["full", "adapter-and-merged"])
def test_the_card_carries_hub_metadata_and_says_how_to_load_the_export(facts, tmp_path, lora, merged):
    from huggingface_hub import ModelCard

    facts.lora = lora
    final = tmp_path / "final"
    (final / "merged").mkdir(parents=True)
    written = card.write_cards(final, final / "merged" if merged else None, facts)
    assert written == [final / "README.md", *([final / "merged" / "README.md"] if merged else [])]
    first = ModelCard.load(final / "README.md")
    data = first.data.to_dict()
    assert data["base_model"] == "org/base-model" and data["datasets"] == ["org/prefs"]
    assert data["license"] == "apache-2.0" and data["tags"] == ["aligner", "dpo", "tr_soft", "flipguard"]
    assert data["library_name"] == ("peft" if lora else "transformers")
    assert data["base_model_relation"] == ("adapter" if lora else "finetune")
    text = first.text
    for line in ("| `dpo` | loss | aligner-", "| `tr_soft` | reference_update | aligner-", "alpha=0.6",
                 "| learning rate | 1e-06 |", "| batch | 8 per rank x 1 accumulation x 2 ranks = 16 per step |",
                 "| `train/loss` | 0.5 |", "| `eval/rewards/accuracies` | 0.75 |",
                 "`tr_soft`: Learn Your Reference Model for Real Good Alignment (Gorbatovski et al., 2024), "
                 "[arXiv:2404.09656](https://arxiv.org/abs/2404.09656)"):
        assert line in text, line
    load = ('AutoPeftModelForCausalLM.from_pretrained("me/aligned")' if lora
            else 'AutoModelForCausalLM.from_pretrained("me/aligned")')
    assert load in text
    if merged:
        second = ModelCard.load(final / "merged" / "README.md")
        assert second.data.to_dict()["library_name"] == "transformers"
        assert second.data.to_dict()["base_model_relation"] == "merge"
        assert 'AutoModelForCausalLM.from_pretrained("me/aligned", subfolder="merged")' in second.text
    assert not re.search(r"tensorboard", text)  # loggers are no part of the method
