"""A griffe extension (mkdocs.yml, mkdocstrings' ``extensions``) for the Sphinx-style sources that
``aligner/hookspecs.py`` is written in, so the plugin contract page says what the file says:

- an attribute documented by ``#:`` comments on the lines above it (or at the end of its line) gets them as its
  docstring (griffe reads only a string placed after an attribute);
- the reST roles of every docstring (``:func:`aligner_loss```, ``:class:`StepInputs```, ``:data:`hookimpl```,
  ``:attr:`StepInputs.kl_policy```, ``:meth:`...```) become code spans (markdown has no roles);
- the ``:param ...:`` fields of a docstring move after its prose: the hooks write their fields first and the prose
  after them, and griffe's Sphinx parser would read that prose as part of the last parameter's description.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:func|class|data|meth|attr|mod|obj|exc):`~?([^`]+)`")
FIELD = re.compile(r"^:(?:param|type|returns?|rtype|raises?|var|ivar|cvar)\b")


def sphinx_comment(lines: list[str], first: int, last: int, joiner: str = "\n") -> str:
    """The ``#:`` comment of the statement on lines ``first``..``last`` (1-based) of ``lines``: the comment lines
    right above it, joined by ``joiner``, else the one ending its last line; ``""`` when it has none. The one reader
    of that convention, for this extension and the configuration reference (docs/hooks.py)."""
    above, i = [], first - 2
    while i >= 0 and lines[i].strip().startswith("#:"):
        above.insert(0, lines[i].strip()[2:].strip())
        i -= 1
    trailing = re.search(r"#:\s*(.*)$", lines[last - 1])
    return joiner.join(above) if above else (trailing.group(1).strip() if trailing else "")


def fields_last(text: str) -> str:
    """``text`` with its Sphinx field lines (and their indented continuations) moved after the rest."""
    body, fields, in_field = [], [], False
    for line in text.split("\n"):
        if FIELD.match(line):
            in_field = True
            fields.append(line)
        elif in_field and line.strip() and line[:1].isspace():
            fields.append(line)
        else:
            in_field = False
            body.append(line)
    return "\n".join(body).rstrip() + "\n\n" + "\n".join(fields) if fields else text


class SphinxSources(griffe.Extension):
    def on_attribute_instance(self, *, node: Any, attr: griffe.Attribute, agent: Any, **kwargs: Any) -> None:
        if attr.docstring is not None or attr.lineno is None:
            return
        lines = attr.lines_collection[attr.filepath] if attr.filepath in attr.lines_collection else None
        if not lines:
            return
        text = sphinx_comment(lines, attr.lineno, attr.lineno)
        if text:
            attr.docstring = griffe.Docstring(ROLE.sub(r"`\1`", text), lineno=attr.lineno, parent=attr)

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = fields_last(ROLE.sub(r"`\1`", obj.docstring.value))
