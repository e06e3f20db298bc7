"""The folders of aligner/ are the stages of a run, and imports run one way through them (STYLE.md: "Imports run
one way: a lower layer never imports a higher one").

Every module's imports are read from its source with ``ast`` (imports inside functions and under
``TYPE_CHECKING`` too: an import tucked into a function still ties the two modules together). The checks: no
import cycle among aligner's modules; no module imports from a layer above its own (:data:`LAYERS`, declared
here once); every ``aligner.*`` import names a module that exists; the core never imports a plugin.
"""

from __future__ import annotations

import ast
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: The layers, lowest first. A module belongs to the longest prefix that names it; it may import its own layer and
#: the ones before it. The top-level modules config, hookspecs and registry are the public API every stage reads;
#: the last row holds the stable public paths that only re-export a module moved into a folder.
LAYERS = (
    ("base", ("aligner", "aligner.config", "aligner.hookspecs", "aligner.registry", "aligner.distributed")),
    ("data", ("aligner.data",)),
    ("models", ("aligner.models",)),
    ("scoring", ("aligner.scoring",)),
    ("reference", ("aligner.reference",)),
    ("training", ("aligner.training",)),
    ("evaluation", ("aligner.evaluation",)),
    ("publishing", ("aligner.publishing",)),
    ("recipes", ("aligner.recipes",)),
    ("tools", ("aligner.tools",)),
    ("public paths", ("aligner.comm", "aligner.hub", "aligner.trust_region")),
)
PLUGIN_PACKAGES = ("aligner_plugins", "plugins")


def module_files(root: Path, package: str) -> dict[str, Path]:
    """Dotted module name -> source file, for every module of ``package`` under ``root``."""
    out = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imported_names(module: str, path: Path) -> list[tuple[str, int]]:
    """(dotted name, line) of everything ``module`` imports, anywhere in its file; ``from m import x`` gives both
    ``m.x`` (when x is a submodule) and ``m``, resolved by :func:`import_graph`."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            out += [(f"{source}.{alias.name}|{source}", node.lineno) for alias in node.names]
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) in
              ("import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)):
            out.append((node.args[0].value, node.lineno))
    return out


def defined_names(path: Path) -> set[str] | None:
    """The names a module defines at its top level (None when a star import makes them unknowable)."""
    names = set()
    body = list(ast.parse(path.read_text()).body)
    while body:
        node = body.pop(0)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                names |= {n.id for n in ast.walk(target) if isinstance(n, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            if any(alias.name == "*" for alias in node.names):
                return None
            names |= {(alias.asname or alias.name).split(".")[0] for alias in node.names}
        elif isinstance(node, (ast.If, ast.Try, ast.With)):
            body += node.body + getattr(node, "orelse", []) + [n for h in getattr(node, "handlers", []) for n in h.body]
    return names


def import_graph(root: Path, package: str) -> tuple[dict[str, set[str]], list[str]]:
    """Module -> the modules of ``package`` it imports; and the imports of ``package`` that name nothing there (no
    such module, or ``from m import x`` where m has no x)."""
    files = module_files(root, package)
    defined = {name: defined_names(path) for name, path in files.items()}
    graph: dict[str, set[str]] = {name: set() for name in files}
    missing = []
    for module, path in files.items():
        for name, line in imported_names(module, path):
            submodule, _, source = name.partition("|")
            target = submodule if submodule in files or not source else source
            if target.split(".")[0] != package:
                continue
            where = f"{path.relative_to(root)}:{line}: imports"
            if target not in files:
                missing.append(f"{where} {target}, which is no module of {package}")
                continue
            if target == source and defined[target] is not None and submodule.rpartition(".")[2] not in defined[target]:
                missing.append(f"{where} {submodule}, which {target} does not define")
            if target != module:
                graph[module].add(target)
    return graph, missing


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (``[a, b, ..., a]``) through each group of modules that import each other (Tarjan's components)."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.add(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(group)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    found = []
    for group in groups:
        start = min(group)
        paths, seen = [[start]], {start}  # shortest way back to start inside the group, breadth first
        while paths:
            path = paths.pop(0)
            nexts = sorted(graph[path[-1]] & group)
            if start in nexts:
                found.append(path + [start])
                break
            for w in nexts:
                if w not in seen:
                    seen.add(w)
                    paths.append(path + [w])
    return found


def layer_of(module: str, layers=LAYERS) -> int | None:
    best = None
    for rank, (_, prefixes) in enumerate(layers):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > best[1]):
                best = (rank, len(prefix))
    return None if best is None else best[0]


def upward_imports(graph: dict[str, set[str]], layers=LAYERS) -> list[str]:
    """Each import of a module from a layer above its own, as ``a (layer) imports b (higher layer)``."""
    out = []
    for module in sorted(graph):
        for target in sorted(graph[module]):
            mine, theirs = layer_of(module, layers), layer_of(target, layers)
            if mine is not None and theirs is not None and theirs > mine:
                out.append(f"{module} ({layers[mine][0]}) imports {target} ({layers[theirs][0]})")
    return out


def plugin_imports(root: Path, package: str) -> list[str]:
    out = []
    for module, path in module_files(root, package).items():
        for name, line in imported_names(module, path):
            for part in name.split("|"):
                if part.split(".")[0] in PLUGIN_PACKAGES:
                    out.append(f"{path.relative_to(root)}:{line}: imports {part.split('.')[0]}")
                    break
    return out


def test_aligner_has_no_import_cycle():
    graph, _ = import_graph(ROOT, "aligner")
    found = cycles(graph)
    assert not found, "import cycles: " + "; ".join(" -> ".join(c) for c in found)


def test_no_module_imports_from_a_higher_layer():
    graph, _ = import_graph(ROOT, "aligner")
    assert upward_imports(graph) == []


def test_every_module_has_a_layer():
    unplaced = [m for m in module_files(ROOT, "aligner") if layer_of(m) is None]
    assert unplaced == [], f"modules in no layer of tests/test_layout.py LAYERS: {unplaced}; add their folder there"


def test_every_aligner_import_names_a_module():
    _, missing = import_graph(ROOT, "aligner")
    assert missing == []


def test_the_core_imports_no_plugin():
    assert plugin_imports(ROOT, "aligner") == []


def test_the_public_paths_only_reexport():
    """aligner.comm, aligner.hub and aligner.trust_region are stable paths for plugin authors: a docstring and
    imports from the module that owns the code, nothing else (the code has one home)."""
    layer = dict(LAYERS)["public paths"]
    for module in layer:
        path = ROOT / (module.replace(".", "/") + ".py")
        body = ast.parse(path.read_text()).body
        assert isinstance(body[0], ast.Expr) and "stable public path" in body[0].value.value, path
        assert all(isinstance(node, (ast.Import, ast.ImportFrom)) for node in body[1:]), path


def write_package(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))


def test_the_checker_finds_the_cycles_aligner_had(tmp_path):
    """Yesterday's two cycles, rebuilt in a tiny package: one through a TYPE_CHECKING import, one through a
    function-level import. Both are found and named, and the upward import of a data module is reported."""
    write_package(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/config.py": "from pkg.hookspecs import DEFAULT_LOSS\nclass RunConfig: ...\n",
        "pkg/hookspecs.py": """\
            from typing import TYPE_CHECKING
            DEFAULT_LOSS = "dpo"
            if TYPE_CHECKING:
                from pkg.config import RunConfig
            """,
        "pkg/models/__init__.py": "",
        "pkg/models/loading.py": "from pkg.models import hub\nclass ModelError(ValueError): ...\n",
        "pkg/models/hub.py": """\
            def snapshot():
                from .loading import ModelError
                raise ModelError
            """,
        "pkg/data/__init__.py": "",
        "pkg/data/batch.py": "def model_inputs():\n    from pkg.models import attention\n",
        "pkg/models/attention.py": "import pkg.data.batch\n",
        "pkg/data/prepare.py": "import importlib\nimportlib.import_module('aligner_plugins.dpo')\nfrom pkg import gone\n",
    })
    graph, missing = import_graph(tmp_path, "pkg")
    found = {tuple(c) for c in cycles(graph)}
    assert ("pkg.config", "pkg.hookspecs", "pkg.config") in found
    assert ("pkg.models.hub", "pkg.models.loading", "pkg.models.hub") in found
    assert ("pkg.data.batch", "pkg.models.attention", "pkg.data.batch") in found
    assert len(found) == 3
    layers = (("base", ("pkg", "pkg.config", "pkg.hookspecs")), ("data", ("pkg.data",)), ("models", ("pkg.models",)))
    assert upward_imports(graph, layers) == ["pkg.data.batch (data) imports pkg.models.attention (models)"]
    assert missing == [f"{Path('pkg/data/prepare.py')}:3: imports pkg.gone, which pkg does not define"]
    assert plugin_imports(tmp_path, "pkg") == [f"{Path('pkg/data/prepare.py')}:2: imports aligner_plugins"]


def test_the_checker_passes_a_package_whose_imports_run_one_way(tmp_path):
    write_package(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/config.py": "DEFAULT_LOSS = 'dpo'\n",
        "pkg/hookspecs.py": "from pkg.config import DEFAULT_LOSS\n",
        "pkg/data/__init__.py": "from pkg.data.batch import Batch\n",
        "pkg/data/batch.py": "from .. import config\nclass Batch: ...\n",
        "pkg/models/loading.py": "from pkg.data import Batch, batch\n",
    })
    graph, missing = import_graph(tmp_path, "pkg")
    layers = (("base", ("pkg", "pkg.config", "pkg.hookspecs")), ("data", ("pkg.data",)), ("models", ("pkg.models",)))
    assert cycles(graph) == [] and upward_imports(graph, layers) == [] and missing == []
    assert graph["pkg.models.loading"] == {"pkg.data", "pkg.data.batch"}
    assert graph["pkg.data.batch"] == {"pkg.config"}


def test_the_paths_plugins_were_shown_still_import_the_same_objects():
    """``from aligner import hub``, ``from aligner.comm import comm_device`` and ``from aligner.trust_region
    import ...`` (the example plugin and the built-in ones used them) reach the moved code itself."""
    from aligner import comm, hub, trust_region
    from aligner.distributed import comm as moved_comm
    from aligner.models import hub as moved_hub
    from aligner.reference import trust_region as moved_trust_region

    for public, moved in ((comm, moved_comm), (hub, moved_hub), (trust_region, moved_trust_region)):
        names = [n for n in vars(public) if not n.startswith("_")]
        assert names and all(getattr(public, n) is getattr(moved, n) for n in names), public.__name__
    assert {"comm_device"} <= set(vars(comm)) and {"is_hub_id", "snapshot"} <= set(vars(hub))
    assert {"load_reference", "mix_into_reference", "relative_distance", "save_reference"} <= set(vars(trust_region))
