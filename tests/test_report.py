"""The report's panels: the core's own, and those plugins declare (aligner/evaluation/report.py names no plugin tag)."""

import re

from aligner.evaluation import report
from conftest import ROOT


def test_plugins_declare_their_panels_through_the_hook():
    stems = {stem: patterns for stem, _, patterns in report.panels()}
    assert stems["trust_region"] == ["tr/ref_policy_l2"]  # tr_soft and tr_hard declare it; it is drawn once
    assert "flipguard/flip_rate" in stems["flip_rate"]
    assert [p[0] for p in report.panels()].count("trust_region") == 1


def test_the_core_report_names_no_plugin_tag():
    text = (ROOT / "aligner" / "evaluation" / "report.py").read_text()
    assert not re.search(r"\b(tr|flipguard|kto|dpo|ipo)/", text)
