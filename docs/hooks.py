"""The mkdocs hooks of aligner's documentation (``hooks:`` in mkdocs.yml).

- The configuration reference (``configuration.md``) is generated here from the config dataclasses of
  ``aligner/config.py`` (the sections :data:`aligner.config.CORE_SECTIONS`, the top-level keys
  :data:`aligner.config.CORE_SCALARS`) and from the option dataclasses of the built-in plugins
  (``aligner_config_section``), so it cannot drift from the code: each key with its type, its default (the
  dataclass's own, written as YAML) and its help text. The help text of a field is its ``field(metadata={"help":
  ...})`` if it has one, else its Sphinx attribute comment (``#:`` on the lines above the field or at the end of
  its line). A core key without help text fails the build, naming the key.
- ``benchmarks/RESULTS.md`` (and the figures it shows) becomes a page of the site where it lies, so the pages link
  to it as ``benchmarks/RESULTS.md`` and mkdocs checks those links.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re
import sys
import textwrap
import typing
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))  # mkdocs loads this file by path; its neighbour too
from griffe_sphinx import ROLE, sphinx_comment  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
#: The line of ``configuration.md`` that the generated reference replaces.
MARKER = "<!-- config-reference: generated from aligner/config.py by docs/hooks.py -->"
#: Files of the repository published as they lie: the benchmark results and the figures they show.
RESULTS = ("benchmarks/RESULTS.md", "benchmarks/study_tr/*.png", "benchmarks/study_flipguard/*.png")


class MissingHelp(ValueError):
    """A config key has no help text for the reference."""


def comment_help(cls: type) -> dict[str, str]:
    """The ``#:`` comments of ``cls``'s own fields, by field name (those above the field, else the one ending its
    line), read from its source; ``{}`` when the source cannot be read."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    lines = source.split("\n")
    node = ast.parse(source).body[0]
    out: dict[str, str] = {}
    for item in node.body if isinstance(node, ast.ClassDef) else ():
        if not (isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)):
            continue
        text = sphinx_comment(lines, item.lineno, item.end_lineno, " ")
        if text:
            out[item.target.id] = text
    return out


def field_help(cls: type) -> dict[str, str]:
    """The help text of each field of dataclass ``cls``: ``metadata["help"]``, else its ``#:`` comment (inherited
    fields from the base class that declares them)."""
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            out.update(comment_help(klass))
    for f in dataclasses.fields(cls):
        if "help" in f.metadata:
            out[f.name] = str(f.metadata["help"])
    return out


def default_of(f: dataclasses.Field) -> Any:
    """The default of field ``f`` (its ``default_factory`` called), or ``dataclasses.MISSING``."""
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def yaml_value(value: Any) -> str:
    """``value`` as one line of YAML, as a config file would write it (``null``, ``true``, ``[dpo]``, ``1.0e-06``)."""
    if dataclasses.is_dataclass(value):
        value = dataclasses.asdict(value)
    text = yaml.safe_dump(value, default_flow_style=True, width=1 << 20, allow_unicode=True).strip()
    return text.removesuffix("...").strip()


def _type_name(tp: Any) -> str:
    return tp if isinstance(tp, str) else inspect.formatannotation(tp)


def _markdown(text: str) -> str:
    """A docstring-style help text as one table cell: reST literals and roles to code spans, the pipes outside code
    spans escaped (a table's cells split there; inside a code span a pipe is text)."""
    text = ROLE.sub(r"`\1`", text)
    text = re.sub(r"``([^`]+)``", r"`\1`", text)
    parts = text.split("`")
    return "`".join(part if i % 2 else part.replace("|", "\\|") for i, part in enumerate(parts))


def _cell(text: str) -> str:
    return f"`{text}`"


def _nested(cls: type, name: str) -> type | None:
    """The dataclass that field ``name`` of ``cls`` holds (``model.lora``: ``LoraSection``), if any."""
    tp = typing.get_type_hints(cls).get(name)
    for arg in (tp, *typing.get_args(tp)):
        if isinstance(arg, type) and dataclasses.is_dataclass(arg):
            return arg
    return None


def section_rows(cls: type, prefix: str, require_help: bool = True,
                 only: Any = None) -> list[tuple[str, str, str, str, type | None]]:
    """``(key, type, default, help, nested dataclass)`` for each field of the dataclass ``cls`` of section ``prefix``
    (``only``: the field names to list, default all).

    :raises MissingHelp: with ``require_help``, for a field without help text, naming it and where to add it.
    """
    helps = field_help(cls)
    rows = []
    for f in dataclasses.fields(cls):
        if only is not None and f.name not in only:
            continue
        key = f"{prefix}.{f.name}" if prefix else f.name
        if require_help and not helps.get(f.name):
            where = inspect.getsourcefile(cls) or cls.__module__
            raise MissingHelp(f"config key {key} ({cls.__name__}.{f.name}) has no help text for the configuration "
                              f"reference; add a '#:' comment above the field in {Path(where).name}, or "
                              f"field(metadata={{'help': ...}})")
        default = default_of(f)
        rows.append((key, _type_name(f.type), "required" if default is dataclasses.MISSING else yaml_value(default),
                     helps.get(f.name, ""), _nested(cls, f.name)))
    return rows


def _table(rows: list[tuple[str, str, str, str, Any]]) -> list[str]:
    out = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for key, tp, default, help_text, _ in rows:
        out.append(f"| {_cell(key)} | {_cell(tp)} | {_cell(default)} | {_markdown(help_text) or '—'} |")
    return out


def _section(title: str, cls: type, prefix: str, require_help: bool) -> list[str]:
    rows = section_rows(cls, prefix, require_help)
    out = [f"### {title}", ""]
    doc = inspect.getdoc(cls) or ""
    if doc and not doc.startswith(f"{cls.__name__}("):  # a dataclass without a docstring gets its signature
        out += [_markdown(doc), ""]
    out += [*_table(rows), ""]
    for key, _, _, _, nested in rows:
        if nested is not None:
            out += _section(f"`{key}`", nested, key, require_help)
    return out


def core_reference(run: type | None = None, scalars: dict[str, Any] | None = None,
                   sections: dict[str, type] | None = None) -> str:
    """The reference of the core keys: the top-level keys (the fields of ``run`` named in ``scalars``), then one
    section per dataclass of ``sections`` (defaults: aligner.config's ``RunConfig``, ``CORE_SCALARS`` and
    ``CORE_SECTIONS``); nested dataclasses (``model.lora``) get a section of their own."""
    from aligner import config

    run = run or config.RunConfig
    scalars = config.CORE_SCALARS if scalars is None else scalars
    sections = config.CORE_SECTIONS if sections is None else sections
    top = section_rows(run, "", require_help=True, only=scalars)
    out = ["### Top-level keys", "", *_table(top), ""]
    for name, cls in sections.items():
        out += _section(f"`{name}`", cls, name, require_help=True)
    return "\n".join(out)


def builtin_plugin_sections() -> dict[str, tuple[str, type]]:
    """Section name -> (plugin name, options dataclass) of every plugin that aligner's own distribution ships."""
    from aligner import registry

    ours = {name for name, ap in registry.available_plugins().items()
            if ap.distribution.rsplit("-", 1)[0].replace("_", "-") == "aligner"}
    everything = registry.installed()
    out = {}
    for name in sorted(ours & set(everything.infos)):
        section = everything.call_one(name, "aligner_config_section")
        if section:
            out[section[0]] = (name, section[1])
    return dict(sorted(out.items()))


def plugin_reference() -> str:
    """One section per built-in plugin that has options (every key with its type and default)."""
    out = []
    for section, (plugin, cls) in builtin_plugin_sections().items():
        out += _section(f"`{section}` (plugin `{plugin}`)", cls, section, require_help=False)
    return "\n".join(out)


def reference_markdown() -> str:
    """The whole generated part of ``configuration.md``."""
    return "\n".join([core_reference(), "## Plugin sections", "",
                      "Each active plugin adds its section; a section of an installed plugin that is not active is "
                      "refused with the flag to add it (`--plugins`, or `report_to` for a logger).", "",
                      plugin_reference()])


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    if page.file.src_uri != "configuration.md":
        return markdown
    if MARKER not in markdown:
        raise MissingHelp(f"docs/configuration.md lost its marker line {MARKER!r}, where the reference goes")
    return markdown.replace(MARKER, reference_markdown())


def on_files(files: Any, config: Any) -> Any:
    from mkdocs.structure.files import File

    for pattern in RESULTS:
        for path in sorted(ROOT.glob(pattern)):
            files.append(File.generated(config, path.relative_to(ROOT).as_posix(), abs_src_path=str(path)))
    return files
