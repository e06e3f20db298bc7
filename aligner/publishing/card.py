"""The model card of an export: ``final/README.md`` (and ``final/merged/README.md``), with Hugging Face metadata.

The metadata block (``huggingface_hub.ModelCardData``) holds ``base_model`` (``model.name_or_path`` when it is
a Hub ID), ``datasets`` (the Hub IDs among ``data.train``/``data.eval``), ``library_name`` (``transformers``,
or ``peft`` for a LoRA adapter), ``tags`` (``aligner`` and the run's plugins, loggers aside) and ``license``
when the base model's own card has one. The text says what was trained and how: the plugins with their
versions and options, the key hyperparameters, the final and eval metrics, how to load the model, and each
method's citation.

Citations are read from the plugins' module docstrings, where each cited paper is written
``Title (Authors, Year, arXiv:NNNN.NNNNN, ...)`` before the first formula (:func:`citations`): nothing is typed twice, and a
third-party plugin that writes its docstring the same way is cited the same way.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aligner.models import hub

ARXIV = re.compile(r"arXiv:(\d{4}\.\d{4,5})")
_NAME_PART = re.compile(r"^[A-Z][\w'’.\-]*(?: (?:and|et al\.|[A-Z][\w'’.\-]*))*$")
_YEAR_PART = re.compile(r"^(?:[A-Z]+ )?((?:19|20)\d\d)$")


@dataclass(frozen=True)
class Citation:
    """One paper a plugin cites: the title as its docstring gives it, the authors, the year and the arXiv id."""

    arxiv_id: str
    title: str
    authors: str
    year: str

    @property
    def url(self) -> str:
        return f"https://arxiv.org/abs/{self.arxiv_id}"


def citations(docstring: str | None) -> list[Citation]:
    """Every paper cited in ``docstring`` as ``Title (Authors, Year, arXiv:ID...)``, in order, each id once.

    Only the docstring's lead is read: the text before its first indented line (the first formula), where a
    plugin says what it implements; a paper named later (for contrast, "this is not X") is not the method's.

    Inside the parentheses (split at ``;`` when they cite several papers) the authors are the run of
    capitalised name parts before the year (``Chowdhury, Kini and Natarajan``; ``Zhu et al.``, then ``EMNLP
    2024``). The title is a quoted string inside them, else the words before the authors (``after SLiC``,
    ``the NLL term of RPO``), else a quoted string just before them, else the words before them back to a
    colon or the sentence's start (``DPO: Direct Preference Optimization (``).
    """
    lines = (docstring or "").splitlines()
    lead = next((i for i, line in enumerate(lines) if line.startswith("    ") and line.strip()), len(lines))
    text = " ".join(" ".join(lines[:lead]).split())
    found: list[Citation] = []
    for match in ARXIV.finditer(text):
        arxiv_id = match.group(1)
        if any(c.arxiv_id == arxiv_id for c in found):
            continue
        open_at = text.rfind("(", 0, match.start())
        if open_at < 0 or ")" in text[open_at:match.start()]:
            continue
        segment = text[open_at + 1:match.start()]
        segment = segment[segment.rfind(";") + 1:]
        quoted = re.findall(r'"([^"]+)"', segment)
        parts = [p.strip() for p in re.sub(r'"[^"]+"', "", segment).split(",") if p.strip()]
        year_at = next((i for i, p in enumerate(parts) if _YEAR_PART.match(p)), None)
        if year_at is None:
            continue
        first_name = year_at
        while first_name > 0 and _NAME_PART.match(parts[first_name - 1]):
            first_name -= 1
        authors = ", ".join(parts[first_name:year_at])
        lead = ", ".join(parts[:first_name])
        title = quoted[0] if quoted else _strip_lead(lead) or _title_before(text[:open_at])
        if authors and title:
            found.append(Citation(arxiv_id, title, authors, _YEAR_PART.match(parts[year_at]).group(1)))
    return found


def _strip_lead(lead: str) -> str:
    return re.sub(r"^(after|see|from|as in)\s+", "", lead.strip(), flags=re.IGNORECASE)


def _title_before(text: str) -> str:
    """The words before a citation's parenthesis: a quoted title, else back to a colon or a sentence's start."""
    text = text.rstrip()
    quoted = re.search(r'"([^"]+)"\s*$', text)
    if quoted:
        return quoted.group(1)
    start = max(text.rfind(": "), text.rfind(". "), text.rfind('"""'))
    title = text[start + 2:] if start >= 0 else text
    return _strip_lead(title.strip(" ,"))


def plugin_citations(plugins) -> dict[str, list[Citation]]:
    """The citations of every active plugin but the loggers, read from the module its entry point names."""
    out = {}
    for name in plugins.training:
        module = importlib.import_module(plugins.targets[name].partition(":")[0])
        out[name] = citations(module.__doc__)
    return out


@dataclass
class CardFacts:
    """What a model card says, gathered once from the run (:func:`card_facts`)."""

    title: str
    base_model: str | None
    base_source: str
    datasets: list[str]
    license: str | None
    plugins: list[dict[str, Any]]
    hyperparameters: dict[str, Any]
    metrics: dict[str, float]
    citations: dict[str, list[Citation]]
    repo: str | None = None
    lora: bool = False


def hub_ids(spec: Any) -> list[str]:
    """The Hub dataset IDs among ``data.train``/``data.eval`` (a name, or a mixture's entries)."""
    entries = spec if isinstance(spec, list) else [spec]
    names = [e.get("path") if isinstance(e, dict) else e for e in entries]
    return [n for n in names if isinstance(n, str) and "/" in n and hub.is_hub_id(n)]


def base_license(policy_path: Path) -> str | None:
    """The ``license`` of the base model's own card (``README.md`` beside its weights), if it has one."""
    readme = Path(policy_path) / "README.md"
    if not readme.is_file():
        return None
    from huggingface_hub import ModelCard

    try:
        return ModelCard.load(readme).data.to_dict().get("license")
    except Exception:  # noqa: BLE001 - a card we cannot parse is a card without a license
        return None


def card_facts(cfg, plugins, world: int, policy_path: Path, metrics: dict[str, float]) -> CardFacts:
    """Everything the model card says, from the config, the active plugins and the final metrics."""
    conf = cfg.to_dict()
    rows = []
    for name in plugins.training:
        section = plugins.call_one(name, "aligner_config_section")
        rows.append({"name": name, "role": plugins.infos[name].role, "version": plugins.versions.get(name, "unknown"),
                     "options": conf.get(section[0], {}) if section else {}})
    t, d = cfg.train, cfg.data
    hyper = {"learning rate": t.lr, "schedule": f"{t.lr_schedule}, {t.warmup_steps} warm-up steps",
             "optimizer steps": t.max_steps,
             "batch": f"{t.micro_batch_size} per rank x {t.grad_accum} accumulation x {world} ranks = "
                      f"{t.micro_batch_size * t.grad_accum * world} per step",
             "max length": d.max_length, "dtype": cfg.model.dtype, "ZeRO stage": t.zero_stage, "seed": t.seed}
    if cfg.model.lora is not None:
        lora = cfg.model.lora
        hyper["LoRA"] = f"r={lora.r}, alpha={lora.alpha}, dropout={lora.dropout}, target_modules={lora.target_modules}"
    name = cfg.model.name_or_path
    repo = cfg.export.hub_model_id
    return CardFacts(
        title=(repo or Path(cfg.output_dir).name).split("/")[-1],
        base_model=name if "/" in name and hub.is_hub_id(name) else None, base_source=name,
        datasets=list(dict.fromkeys(hub_ids(d.train) + hub_ids(d.eval))), license=base_license(policy_path),
        plugins=rows, hyperparameters=hyper, metrics=dict(metrics), citations=plugin_citations(plugins), repo=repo,
        lora=cfg.model.lora is not None)


def metadata(facts: CardFacts, library: str, relation: str | None) -> str:
    from huggingface_hub import ModelCardData

    data = ModelCardData(base_model=facts.base_model, datasets=facts.datasets or None, library_name=library,
                         license=facts.license, tags=["aligner", *[p["name"] for p in facts.plugins]],
                         pipeline_tag="text-generation")
    if facts.base_model and relation:
        data.base_model_relation = relation
    return data.to_yaml()


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else f"`{value}`" if isinstance(value, (dict, list)) else str(value)


def body(facts: CardFacts, kind: str) -> str:
    """The card's text for ``kind``: ``full`` (all weights), ``adapter`` (a PEFT adapter) or ``merged``."""
    methods = " + ".join(p["name"] for p in facts.plugins)
    what = {"full": "all weights", "adapter": "a LoRA adapter (PEFT)", "merged": "the LoRA adapter merged into the base"}[kind]
    lines = [f"# {facts.title}", "",
             f"Trained from `{facts.base_source}` with aligner ({methods}); "
             f"this folder holds {what}.", "", "## Plugins", "", "| plugin | role | package | options |", "|---|---|---|---|"]
    for p in facts.plugins:
        options = ", ".join(f"{k}={v}" for k, v in p["options"].items()) or "—"
        lines.append(f"| `{p['name']}` | {p['role']} | {p['version']} | {options} |")
    lines += ["", "## Training", "", "| setting | value |", "|---|---|"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in facts.hyperparameters.items()]
    train = {k: v for k, v in facts.metrics.items() if not k.startswith("eval/")}
    evals = {k: v for k, v in facts.metrics.items() if k.startswith("eval/")}
    for heading, values in (("Final training metrics (last step)", train), ("Evaluation (end of training)", evals)):
        if values:
            lines += ["", f"## {heading}", "", "| metric | value |", "|---|---|"]
            lines += [f"| `{k}` | {v:.4g} |" for k, v in sorted(values.items())]
    lines += ["", "## How to load", "", "```python", *load_snippet(facts, kind), "```"]
    cited = [(name, c) for name, cs in facts.citations.items() for c in cs]
    if cited:
        lines += ["", "## Citations", ""]
        lines += [f"- `{name}`: {c.title} ({c.authors}, {c.year}), [arXiv:{c.arxiv_id}]({c.url})" for name, c in cited]
    return "\n".join(lines) + "\n"


def load_snippet(facts: CardFacts, kind: str) -> list[str]:
    where = facts.repo or "path/to/final"
    if kind == "adapter":
        return ["from peft import AutoPeftModelForCausalLM",
                f'model = AutoPeftModelForCausalLM.from_pretrained("{where}")  # loads the base `{facts.base_source}`, then the adapter']
    sub = ', subfolder="merged"' if kind == "merged" and facts.repo else ""
    where = f"{where}/merged" if kind == "merged" and not facts.repo else where
    return ["from transformers import AutoModelForCausalLM, AutoTokenizer",
            f'model = AutoModelForCausalLM.from_pretrained("{where}"{sub})',
            f'tokenizer = AutoTokenizer.from_pretrained("{where}"{sub})']


def write_card(folder: Path, facts: CardFacts, kind: str) -> Path:
    """Write ``folder/README.md`` for ``kind`` (``full``, ``adapter`` or ``merged``), replacing any card there."""
    library = "peft" if kind == "adapter" else "transformers"
    relation = {"full": "finetune", "adapter": "adapter", "merged": "merge"}[kind]
    path = folder / "README.md"
    path.write_text(f"---\n{metadata(facts, library, relation)}\n---\n\n{body(facts, kind)}")
    return path


def write_cards(final: Path, merged: Path | None, facts: CardFacts) -> list[Path]:
    """The card of ``final/`` (full weights, or the adapter under LoRA) and of ``final/merged`` when there is one."""
    written = [write_card(final, facts, "adapter" if facts.lora else "full")]
    if merged is not None:
        written.append(write_card(merged, facts, "merged"))
    return written
