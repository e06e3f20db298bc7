"""The documentation site (mkdocs.yml, docs/) and the README: the site builds with no warning, the generated
configuration reference follows the dataclasses of aligner/config.py, and the tables that name plugins name every
built-in one."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import subprocess
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from aligner import config, registry

ROOT = Path(__file__).resolve().parent.parent


def _load_hooks():
    spec = importlib.util.spec_from_file_location("aligner_docs_hooks", ROOT / "docs" / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


hooks = _load_hooks()


def _cells(line: str) -> list[str]:
    """The cells of a markdown table row, as Python-Markdown splits them: at pipes outside code spans, unescaped."""
    cells, cell, code, i = [], "", False, 0
    while i < len(line):
        ch = line[i]
        if ch == "\\" and line[i + 1:i + 2] == "|" and not code:
            cell, i = cell + "|", i + 2
            continue
        if ch == "`":
            code = not code
        if ch == "|" and not code:
            cells.append(cell.strip())
            cell = ""
        else:
            cell += ch
        i += 1
    return cells[1:]


def _rows(markdown: str) -> dict[str, tuple[str, str, str]]:
    """key -> (type, default, meaning) of every row of the reference's tables."""
    out = {}
    for line in markdown.splitlines():
        cells = _cells(line) if line.startswith("|") else []
        if len(cells) == 4 and cells[0].startswith("`") and cells[0] != "`key`":
            out[cells[0].strip("`")] = tuple(c.strip("`") for c in cells[1:])
    return out


def _as_yaml(value) -> str:
    if dataclasses.is_dataclass(value):
        value = dataclasses.asdict(value)
    return yaml.safe_dump(value, default_flow_style=True, width=1 << 20, allow_unicode=True).replace("...", "").strip()


def _expected_keys(cls: type, prefix: str) -> dict[str, object]:
    """Every key of section ``cls`` (nested sections included) with its default, from the dataclass itself."""
    out: dict[str, object] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}"
        out[key] = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        nested = [a for a in (hints[f.name], *typing.get_args(hints[f.name])) if dataclasses.is_dataclass(a)]
        if nested:
            out.update(_expected_keys(nested[0], key))
    return out


def test_site_builds_strict_with_every_page(tmp_path):
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)], cwd=ROOT,
                          capture_output=True, text=True, env=env, timeout=300)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log
    assert "WARNING" not in log, log
    nav = yaml.load((ROOT / "mkdocs.yml").read_text(), Loader=yaml.BaseLoader)["nav"]
    pages = [next(iter(item.values())) for item in nav]
    assert set(pages) >= {p.relative_to(ROOT / "docs").as_posix() for p in (ROOT / "docs").glob("*.md")}
    for page in pages:
        html = site / (page.removesuffix(".md").removesuffix("index") + "/index.html").lstrip("/")
        assert html.is_file(), f"{page} was not built ({html})"
    reference = (site / "configuration" / "index.html").read_text()
    assert "train.max_steps" in reference and "model.lora.reference_rank" in reference and "dpo.beta" in reference
    contract = (site / "plugin-contract" / "index.html").read_text()
    assert "aligner_loss" in contract and "aligner_after_optimizer_step" in contract and "StepInputs" in contract
    # docs/griffe_sphinx.py: the #: comments of hookspecs' constants are their docs, no reST role is left raw
    assert "The hook each role must implement" in contract and ":func:" not in contract and ":class:" not in contract
    assert (site / "benchmarks" / "study_tr" / "gold_vs_kl.png").is_file()


def test_config_reference_lists_every_key_with_its_default():
    rows = _rows(hooks.core_reference())
    expected = {key: getattr(config.RunConfig(), key) for key in config.CORE_SCALARS}
    for name, cls in config.CORE_SECTIONS.items():
        expected.update(_expected_keys(cls, name))
    assert set(rows) == set(expected)
    for key, default in expected.items():
        tp, shown, meaning = rows[key]
        assert shown == _as_yaml(default), key
        assert meaning and meaning != "—", key
    assert rows["train.lr"][1] == "1.0e-06" and rows["model.lora.target_modules"][1] == "all-linear"
    assert rows["plugins"][1] == "[dpo]" and rows["data.eval"][0] == "str | list[Any] | None"


def test_plugin_sections_of_the_reference_follow_their_dataclasses():
    sections = hooks.builtin_plugin_sections()
    assert {"dpo", "tr_soft", "flipguard", "wandb", "mlflow", "trackio"} <= set(sections)
    rows = _rows(hooks.plugin_reference())
    for section, (_, cls) in sections.items():
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            assert rows[f"{section}.{f.name}"][1] == _as_yaml(default)


@dataclass
class _TrainWithAKnob(config.TrainConfig):
    #: a knob only this test has,
    #: written over two lines
    extra_knob: int = 7
    other_knob: str = field(default="x", metadata={"help": "help from the field's metadata"})


@dataclass
class _TrainWithAMuteKnob(config.TrainConfig):
    mute_knob: bool = False


def test_a_key_added_to_a_dataclass_appears_in_the_reference():
    rows = _rows(hooks.core_reference(sections={**config.CORE_SECTIONS, "train": _TrainWithAKnob}))
    assert rows["train.extra_knob"] == ("int", "7", "a knob only this test has, written over two lines")
    assert rows["train.other_knob"] == ("str", "x", "help from the field's metadata")
    assert rows["train.max_steps"][1] == "1000"


def test_a_key_without_help_text_fails_the_reference_naming_it():
    with pytest.raises(hooks.MissingHelp, match=r"train\.mute_knob .*add a '#:' comment"):
        hooks.core_reference(sections={**config.CORE_SECTIONS, "train": _TrainWithAMuteKnob})


def _builtin_roles() -> dict[str, str]:
    ours = {n for n, ap in registry.available_plugins().items() if ap.distribution.rsplit("-", 1)[0] == "aligner"}
    return {n: info.role for n, info in registry.installed().infos.items() if n in ours}


def test_plugin_tables_name_every_builtin_plugin():
    roles = _builtin_roles()
    table = (ROOT / "docs" / "plugins.md").read_text()
    listed = set(re.findall(r"^\| `(\w+)` \| (\w+) \|", table, re.M))
    assert listed == {(n, r) for n, r in roles.items() if r != "logger"}
    readme = (ROOT / "README.md").read_text()
    for name, role in roles.items():
        row = next((ln for ln in readme.splitlines() if ln.startswith(f"| {role} ")), "")
        assert f"`{name}`" in row, f"README's plugin table has no {name} in its {role} row"


def test_readme_is_short_and_its_links_resolve():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) < 150
    assert "\n## Layout\n" in readme and "make run" in readme and "make test" in readme
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", readme)
    assert links and all((ROOT / link).exists() for link in links if "://" not in link), links
