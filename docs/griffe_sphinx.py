"""A griffe extension (mkdocs.yml, mkdocstrings' ``extensions``) for the Sphinx-style sources that
``aligner/hookspecs.py`` is written in, so the plugin contract page says what the file says:

- an attribute documented by ``#:`` comments on the lines above it (or at the end of its line) gets them as its
  docstring (griffe reads only a string placed after an attribute);
- the reST roles of every docstring (``:func:`aligner_loss```, ``:class:`StepInputs```, ``:data:`hookimpl```,
  ``:attr:`StepInputs.kl_policy```, ``:meth:`...```) become code spans (markdown has no roles).
"""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:func|class|data|meth|attr|mod|obj|exc):`~?([^`]+)`")


class SphinxSources(griffe.Extension):
    def on_attribute_instance(self, *, node: Any, attr: griffe.Attribute, agent: Any, **kwargs: Any) -> None:
        if attr.docstring is not None or attr.lineno is None:
            return
        lines = attr.lines_collection[attr.filepath] if attr.filepath in attr.lines_collection else None
        if not lines:
            return
        above, i = [], attr.lineno - 2
        while i >= 0 and lines[i].strip().startswith("#:"):
            above.insert(0, lines[i].strip()[2:].strip())
            i -= 1
        trailing = re.search(r"#:\s*(.*)$", lines[attr.lineno - 1])
        text = "\n".join(above) if above else (trailing.group(1).strip() if trailing else "")
        if text:
            attr.docstring = griffe.Docstring(ROLE.sub(r"`\1`", text), lineno=attr.lineno, parent=attr)

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = ROLE.sub(r"`\1`", obj.docstring.value)
