"""The import graph of mbert_train/ and data_prep/, read with `ast` (function-level imports
included, nothing imported): no cycle, no private name across modules, and the layering the
packages promise (parallel/ knows no model, data/ knows no trainer)."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("mbert_train", "data_prep")

# Today's exceptions, each a boundary in the wrong place: fix one and delete its line; never add one.
# (importer, imported module, private name)
PRIVATE_IMPORTS_ALLOWED: set[tuple[str, str, str]] = set()
# (importer, imported module) across a layer boundary
LAYER_IMPORTS_ALLOWED = {
    # Only for the annotation of ParallelDims.check_model(cfg), under TYPE_CHECKING; nothing runs.
    ("mbert_train.parallel.layout", "mbert_train.model.config"),
    # Only for the annotations of the FLOP and memory formulas' arguments, under TYPE_CHECKING.
    ("mbert_train.arithmetic", "mbert_train.model.config"),
    ("mbert_train.arithmetic", "mbert_train.data.config"),
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def read_modules() -> dict[str, ast.Module]:
    return {module_name(path): ast.parse(path.read_text(encoding="utf-8"), str(path))
            for package in PACKAGES for path in sorted((ROOT / package).rglob("*.py"))}


def imports(name: str, tree: ast.Module, modules) -> list[tuple[str, str | None]]:
    """(imported project module, imported name or None) of every import statement in the module.
    `from pkg import sub` names the module pkg.sub when that is one; relative imports resolve."""
    package = name if (ROOT / Path(*name.split(".")) / "__init__.py").is_file() else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, *([base] if base else [])])
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.append((sub, None) if sub in modules else (base, alias.name))
    return [(target, imported) for target, imported in found if target.split(".")[0] in PACKAGES]


@pytest.fixture(scope="module")
def graph() -> dict[str, list[tuple[str, str | None]]]:
    modules = read_modules()
    return {name: imports(name, tree, modules) for name, tree in modules.items()}


def test_the_reader_sees_the_imports(graph):
    assert "mbert_train.convert.cli" in graph and "data_prep.prep" in graph
    assert ("mbert_train.convert.common", "check_tensors") in graph["mbert_train.convert.hf"]
    assert ("mbert_train.convert.cli", "main") in graph["mbert_train.convert"]
    assert ("data_prep.format", None) in graph["mbert_train.convert.hf"]  # `from data_prep import format`
    assert ("data_prep.prep", "prepare") in graph["mbert_train.data.default_corpus"]  # inside a function


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle [a, b, ..., a] of the directed graph, or None (depth-first, three colours)."""
    state, stack = {}, []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle(graph):
    edges = {name: {target for target, _ in found if target in graph and target != name}
             for name, found in graph.items()}
    cycle = find_cycle(edges)
    assert cycle is None, f"import cycle: {' -> '.join(cycle)}"


def test_no_private_name_imported_across_modules(graph):
    found = {(name, target, imported) for name, edges in graph.items() for target, imported in edges
             if imported and imported.startswith("_") and not imported.startswith("__") and target != name}
    assert found - PRIVATE_IMPORTS_ALLOWED == set(), "move the name's boundary or make it public"
    assert PRIVATE_IMPORTS_ALLOWED - found == set(), "fixed: delete it from PRIVATE_IMPORTS_ALLOWED"


def layer_imports(graph, lower: str, upper: tuple[str, ...]) -> set[tuple[str, str]]:
    """(importer, imported) where a module of package `lower` imports one of the `upper` modules."""
    def inside(module: str, package: str) -> bool:
        return module == package or module.startswith(f"{package}.")

    return {(name, target) for name, edges in graph.items() if inside(name, lower)
            for target, _ in edges if any(inside(target, m) for m in upper)}


# The layers of docs/architecture.md, lowest first. A module imports only modules of lower layers
# or of its own part (the same file, or the same folder: mbert_train.model.bert may import
# mbert_train.model.config). Names are prefixes: "mbert_train.checkpoint" covers a module or a package.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("mbert_train.errors", "mbert_train.staging", "mbert_train.batch", "mbert_train.arithmetic", "mbert_train.rng",
     "mbert_train.manifest", "mbert_train.launcher"),
    ("mbert_train.lease", "mbert_train.parallel", "data_prep"),
    ("mbert_train.model", "mbert_train.data"),
    ("mbert_train.config", "mbert_train.metrics", "mbert_train.plot"),
    ("mbert_train.checkpoint",),
    ("mbert_train.engine", "mbert_train.convert", "mbert_train.plan"),
    ("mbert_train.trainer",),
    ("mbert_train.train", "mbert_train"),
)


def part_of(module: str) -> tuple[int, str] | None:
    """(layer, part) of a module: the longest prefix in LAYERS that names it."""
    found = [(len(prefix), layer, prefix) for layer, prefixes in enumerate(LAYERS) for prefix in prefixes
             if module == prefix or module.startswith(f"{prefix}.")]
    return max(found)[1:] if found else None


def test_every_module_has_a_layer(graph):
    assert [name for name in graph if part_of(name) is None] == [], "add it to LAYERS (and docs/architecture.md)"


def upward_imports(graph) -> set[tuple[str, str]]:
    upward = set()
    for name, edges in graph.items():
        layer, part = part_of(name)
        for target, _ in edges:
            if target == "mbert_train":
                continue  # the package root holds the version only
            target_layer, target_part = part_of(target)
            if target_part != part and target_layer >= layer:
                upward.add((name, target))
    return upward


def test_imports_go_down_the_layers(graph):
    assert upward_imports(graph) - LAYER_IMPORTS_ALLOWED == set(), \
        "an import against the layers of docs/architecture.md: move the code to its layer"


def test_the_layers_promise_what_the_docs_say():
    assert part_of("mbert_train.parallel.layers")[0] < part_of("mbert_train.model.bert")[0]
    assert part_of("mbert_train.data.loader")[0] < part_of("mbert_train.trainer")[0]
    assert part_of("mbert_train.data.loader")[0] < part_of("mbert_train.engine")[0]
    assert part_of("mbert_train.model.bert")[0] < part_of("mbert_train.checkpoint")[0]


def test_parallel_does_not_import_the_model(graph):
    assert layer_imports(graph, "mbert_train.parallel", ("mbert_train.model",)) <= LAYER_IMPORTS_ALLOWED


def test_data_does_not_import_the_trainer(graph):
    above = ("mbert_train.trainer", "mbert_train.engine", "mbert_train.train")
    assert layer_imports(graph, "mbert_train.data", above) <= LAYER_IMPORTS_ALLOWED


def test_layer_exceptions_are_still_needed(graph):
    assert LAYER_IMPORTS_ALLOWED - upward_imports(graph) == set(), "fixed: delete it from LAYER_IMPORTS_ALLOWED"


def test_the_test_forkserver_preloads_modules_that_exist():
    """multiprocessing's forkserver swallows an ImportError of its preload: a module renamed away
    would silently end the preload there, and every forked run would import the rest itself."""
    import importlib.util

    tree = ast.parse((ROOT / "tests" / "preload.py").read_text(encoding="utf-8"))
    names = next(ast.literal_eval(node.value) for node in tree.body
                 if isinstance(node, ast.Assign) and node.targets[0].id == "MODULES")
    missing = [name for name in names if importlib.util.find_spec(name) is None]
    assert missing == [], f"tests/preload.py MODULES names modules that do not exist: {missing}"
