"""The import graph of diffbir_core/, diffbir_eval/ and diffbir_demo/ against the agreed target layout (docs: LAYOUT,
issue 12).

Every .py file is parsed with `ast`; every import counts, including those inside functions and
`importlib.import_module("...")` calls with a literal name; relative imports are resolved. Checked:
0. every import of a project module names a module that exists (a stale path after a move fails here);
1. no import cycle (the cycle is printed with file:line of each edge);
2. layers point one way: entry points (cli, __main__, train, eval, demo) -> api -> face -> pipeline -> stage2 ->
   diffusion, tiling, models, speed and the other library modules -> weights/imageio/config/types/prompts;
   plus the explicit rules of the layout (only cli/api import api or face.pipeline, the core never imports
   eval or demo, face modules other than face.pipeline never import the pipeline);
3. no module mixes a CLI or UI with library code: argparse/gradio/... only in entry modules, and a library
   module never imports an entry module;
4. the target modules exist and the replaced ones are gone (so the rules above are not vacuous).
Expected values come from the layout document, never from the tree itself.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("diffbir_core", "diffbir_eval", "diffbir_demo")

# ------------------------------------------------------------------------------------------ the target layout
# diffbir_core.<first part> -> layer rank; a module may import only modules of its own rank or lower.
ENTRY, API, FACE, PIPELINE, STAGE2, LIBRARY, LEAF = 6, 5, 4, 3, 2, 1, 0
CORE_RANKS = {
    "cli": ENTRY,
    "__main__": ENTRY,
    "train": ENTRY,
    "batch": ENTRY,  # the CLI's batch loop (collection, naming, checks)
    "api": API,
    "face": FACE,
    "pipeline": PIPELINE,
    "stage2": STAGE2,
    # LIBRARY (the default): diffusion, tiling, models, speed, cleaners, colorfix, degradation, data, captioner
    "weights": LEAF,
    "imageio": LEAF,
    "config": LEAF,
    "types": LEAF,
    "prompts": LEAF,
    "atomic": LEAF,
}
RANK_NAMES = {
    ENTRY: "entry",
    API: "api",
    FACE: "face",
    PIPELINE: "pipeline",
    STAGE2: "stage2",
    LIBRARY: "library (diffusion/tiling/models/speed/...)",
    LEAF: "leaf (weights/imageio/config/types/prompts/atomic)",
}
FACADE = "diffbir_core"  # the package __init__: lazy exports of the public names, exempt as an importer
# Only these core modules may import the dispatcher or the face pipeline.
TOP_IMPORTERS = {"diffbir_core", "diffbir_core.cli", "diffbir_core.api"}
# A module that imports one of these is a CLI or a UI and must be an entry module.
CLI_UI_LIBS = {"argparse", "optparse", "click", "typer", "fire", "gradio", "gradio_client"}
ENTRY_SUFFIXES = ("cli.py", "__main__.py", "run.py", "ui.py", "app.py")
ENTRY_ALLOWLIST: set[str] = set()  # modules allowed to hold a CLI although their file name does not say so

TARGET_MODULES = [
    *(
        f"diffbir_core/{m}.py"
        for m in (
            "__init__",
            "__main__",
            "api",
            "config",
            "types",
            "pipeline",
            "stage2",
            "speed",
            "cli",
            "weights",
            "imageio",
            "colorfix",
            "cleaners",
            "degradation",
            "data",
            "prompts",
            "captioner",
        )
    ),
    *(f"diffbir_core/diffusion/{m}.py" for m in ("schedule", "samplers", "k_samplers", "noise", "cfg", "guidance")),
    *(f"diffbir_core/tiling/{m}.py" for m in ("windows", "cleaner", "vae_blend", "vae_sync", "denoiser", "plan")),
    *(
        f"diffbir_core/models/{m}.py"
        for m in ("vae_runner", "text", "ldm", "controlnet", "swinir", "rrdbnet", "scunet", "ncnn", "convert")
    ),
    *(f"diffbir_core/face/{m}.py" for m in ("align", "detect", "restorer", "pipeline")),
    *(f"diffbir_core/train/{m}.py" for m in ("config", "tasks", "checkpoint", "loop", "__main__")),
    *(f"diffbir_eval/{m}.py" for m in ("methods", "store", "provenance", "summary", "run")),
    # each further eval command: a package = library (__init__) + thin CLI (__main__), `python -m diffbir_eval.X`
    *(
        f"diffbir_eval/{m}/{f}.py"
        for m in ("table", "data", "report", "run_all", "bench")
        for f in ("__init__", "__main__")
    ),
    *(f"diffbir_demo/{m}.py" for m in ("backend", "ui", "app")),
]
REPLACED_MODULES = [  # old path -> moved (LAYOUT.md); the old file must be gone, not left beside the new one
    "diffbir_core/restore.py",
    "diffbir_core/schedule.py",
    "diffbir_core/samplers.py",
    "diffbir_core/guidance.py",
    "diffbir_core/sampling.py",
    "diffbir_core/tiling.py",
    "diffbir_core/train.py",
    "diffbir_core/face/restore.py",
    # a stale module beside its package would be shadowed silently: the command modules became packages
    *(f"diffbir_eval/{m}.py" for m in ("table", "data", "report", "run_all", "bench")),
]


# ------------------------------------------------------------------------------------------------ the graph
@dataclass(frozen=True)
class Edge:
    src: str
    dst: str
    where: str  # file:line of the import
    local: bool  # inside a function


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    mods = {}
    for pkg in PACKAGES:
        for p in sorted((ROOT / pkg).rglob("*.py")):
            if "__pycache__" not in p.parts:
                mods[module_name(p)] = p
    return mods


def _imports(tree: ast.AST, name: str, is_pkg: bool, modules: dict[str, Path]):
    """(target dotted name, line, inside a function, top-level package imported) for every import in the tree."""
    local_lines = {
        n.lineno
        for f in ast.walk(tree)
        if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
        for n in ast.walk(f)
        if isinstance(n, (ast.Import, ast.ImportFrom, ast.Call))
    }
    for node in ast.walk(tree):
        local = getattr(node, "lineno", None) in local_lines
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, node.lineno, local
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                pkg = name.split(".") if is_pkg else name.split(".")[:-1]
                up = node.level - 1
                assert up < len(pkg), f"{name}:{node.lineno}: relative import goes above the top-level package"
                base = ".".join(pkg[: len(pkg) - up] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for a in node.names:
                sub = f"{base}.{a.name}"
                yield (sub if sub in modules else base), node.lineno, local
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            f = node.func
            called = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            if called in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                if not node.args[0].value.startswith("."):
                    yield node.args[0].value, node.lineno, local


def build_graph():
    """Project modules, project-internal import edges (first import per pair), every external top-level package
    each module imports (with its line), and the project imports that name no existing module (file:line name)."""
    modules = project_modules()
    edges: dict[tuple[str, str], Edge] = {}
    external: dict[str, list[tuple[str, int]]] = {}
    unresolved: list[str] = []
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for target, line, local in _imports(tree, name, path.name == "__init__.py", modules):
            rel = f"{path.relative_to(ROOT)}:{line}"
            if target.split(".")[0] not in PACKAGES:
                external.setdefault(name, []).append((target.split(".")[0], line))
            elif target not in modules:
                unresolved.append(f"{rel}: {target}")
            elif target != name:
                edges.setdefault((name, target), Edge(name, target, rel, local))
    return modules, sorted(edges.values(), key=lambda e: (e.src, e.dst)), external, sorted(set(unresolved))


class Graph(tuple):
    def __repr__(self) -> str:  # keeps pytest's failure report short
        return f"<import graph: {len(self[0])} modules, {len(self[1])} edges>"


@pytest.fixture(scope="module")
def graph():
    return Graph(build_graph())


def strongly_connected(nodes, succ) -> list[list[str]]:
    """Tarjan's algorithm (iterative); components with more than one node."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]
    for root in nodes:
        if root in index:
            continue
        work = [(root, iter(succ.get(root, ())))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(succ.get(w, ()))))
                    break
                if w in on:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))
    return out


def one_cycle(comp: list[str], succ) -> list[str]:
    """A shortest cycle through the component's first node (BFS inside the component)."""
    start, inside = comp[0], set(comp)
    prev, frontier = {start: None}, [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(succ.get(v, ())):
                if w == start:
                    path = [v]
                    while prev[path[-1]] is not None:
                        path.append(prev[path[-1]])
                    return [*reversed(path), start]
                if w in inside and w not in prev:
                    prev[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no cycle found in component {comp}")


def rank(mod: str) -> int:
    parts = mod.split(".")
    if parts[0] != "diffbir_core" or len(parts) == 1:
        return ENTRY  # eval, demo and the facade
    return CORE_RANKS.get(parts[1], LIBRARY)


def is_entry(path: Path, mod: str) -> bool:
    return path.name.endswith(ENTRY_SUFFIXES) or mod in ENTRY_ALLOWLIST


def _fmt(e: Edge) -> str:
    return f"{e.src} -> {e.dst}  ({e.where}{', inside a function' if e.local else ''})"


# ------------------------------------------------------------------------------------------------ the tests
def test_graph_sees_the_project(graph):
    modules, edges, _, _ = graph
    assert len(modules) > 20 and {m.split(".")[0] for m in modules} == set(PACKAGES)
    assert len(edges) > 20, "the import walker found almost no project imports: it is broken"


def test_every_project_import_names_a_module(graph):
    """A stale import left behind by a move (e.g. ``from .samplers import X`` after samplers.py went to
    diffusion/) fails only when that code path runs; here it fails at once."""
    unresolved = graph[3]
    assert not unresolved, "imports of project modules that do not exist:\n  " + "\n  ".join(unresolved)


def test_no_import_cycles(graph):
    modules, edges, _, _ = graph
    succ: dict[str, set[str]] = {}
    by_pair = {}
    for e in edges:
        succ.setdefault(e.src, set()).add(e.dst)
        by_pair[(e.src, e.dst)] = e
    cycles = []
    for comp in strongly_connected(sorted(modules), succ):
        cyc = one_cycle(comp, succ)
        steps = "\n      ".join(_fmt(by_pair[(a, b)]) for a, b in zip(cyc, cyc[1:]))
        cycles.append(f"component {comp}:\n      {steps}")
    assert not cycles, "import cycles (function-local imports count):\n  " + "\n  ".join(cycles)


def test_layers_point_one_way(graph):
    _, edges, _, _ = graph
    bad = []
    for e in edges:
        src_core, dst_core = e.src.split(".")[0] == "diffbir_core", e.dst.split(".")[0] == "diffbir_core"
        if src_core and not dst_core:
            bad.append(f"the core imports {e.dst.split('.')[0]}: {_fmt(e)}")
        elif e.src != FACADE and rank(e.dst) > rank(e.src):
            bad.append(f"{RANK_NAMES[rank(e.src)]} imports {RANK_NAMES[rank(e.dst)]}: {_fmt(e)}")
        if (
            src_core
            and e.src not in TOP_IMPORTERS
            and (e.dst == "diffbir_core.api" or e.dst == "diffbir_core.face.pipeline")
        ):
            bad.append(f"only cli/api may import {e.dst}: {_fmt(e)}")
        if (
            e.src.startswith("diffbir_core.face")
            and e.src != "diffbir_core.face.pipeline"
            and e.dst in ("diffbir_core.pipeline", "diffbir_core.stage2")
        ):
            bad.append(f"only face.pipeline may import the general pipeline: {_fmt(e)}")
    assert not bad, "a lower layer imports a higher one:\n  " + "\n  ".join(bad)


def test_cli_and_ui_only_in_entry_modules(graph):
    modules, edges, external, _ = graph
    bad = []
    for mod, imports in sorted(external.items()):
        if is_entry(modules[mod], mod):
            continue
        for lib, line in imports:
            if lib in CLI_UI_LIBS:
                bad.append(
                    f"{mod} imports {lib} ({modules[mod].relative_to(ROOT)}:{line}) but is not an entry "
                    f"module (file name ending in {'/'.join(ENTRY_SUFFIXES)}): move the CLI/UI out"
                )
    for e in edges:
        if not is_entry(modules[e.src], e.src) and e.src != FACADE and is_entry(modules[e.dst], e.dst):
            bad.append(f"library module imports an entry module: {_fmt(e)}")
    assert not bad, "modules mixing a CLI or UI with library code:\n  " + "\n  ".join(bad)


EVAL_COMMANDS = (
    "table",
    "data",
    "report",
    "run_all",
    "bench",
    "bench_official",
)  # diffbir_eval packages: library + thin CLI


def test_eval_command_clis_are_thin():
    """``diffbir_eval/<command>/__main__.py`` holds the command line only: no classes, and besides `build_parser`
    and `main` at most small private helpers (<= 15 lines); the work is in the package's library ``__init__``."""
    bad = []
    for cmd in EVAL_COMMANDS:
        path = ROOT / "diffbir_eval" / cmd / "__main__.py"
        tree = ast.parse(path.read_text(encoding="utf-8"))
        names = set()
        for node in tree.body:
            where = f"{path.relative_to(ROOT)}:{node.lineno}"
            if isinstance(node, ast.ClassDef):
                bad.append(f"{where}: class {node.name} in a CLI module (move it to the library)")
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                names.add(node.name)
                size = node.end_lineno - node.lineno + 1
                if node.name not in ("build_parser", "main") and (not node.name.startswith("_") or size > 15):
                    bad.append(f"{where}: {node.name} ({size} lines) is library code in a CLI module")
        if not {"build_parser", "main"} <= names:
            bad.append(f"{path.relative_to(ROOT)}: needs build_parser() and main()")
    assert not bad, "CLI modules holding library code:\n  " + "\n  ".join(bad)


def test_target_layout_modules_exist():
    missing = [p for p in TARGET_MODULES if not (ROOT / p).is_file()]
    left = [p for p in REPLACED_MODULES if (ROOT / p).exists()]
    assert not missing and not left, f"target modules missing: {missing}\nreplaced modules still present: {left}"


def test_walker_on_a_known_snippet():
    """The walker itself: relative imports resolved against the package, submodules told from names, imports
    inside functions and importlib calls seen, and a two-module circle found as one component."""
    modules = {m: Path() for m in ("pkg", "pkg.a", "pkg.sub", "pkg.sub.b", "pkg.sub.c")}
    src = (
        "import os\n"
        "from . import c\n"  # pkg.sub.c (a submodule)
        "from .. import a, name_in_init\n"  # pkg.a (submodule) and pkg (a name of pkg/__init__)
        "def f():\n"
        "    from ..a import thing\n"  # pkg.a, inside a function
        "    importlib.import_module('pkg.sub.c')\n"
    )
    got = list(_imports(ast.parse(src), "pkg.sub.b", False, modules))
    assert got == [
        ("os", 1, False),
        ("pkg.sub.c", 2, False),
        ("pkg.a", 3, False),
        ("pkg", 3, False),
        ("pkg.a", 5, True),
        ("pkg.sub.c", 6, True),
    ]
    # in a package __init__, "." is the package itself
    assert list(_imports(ast.parse("from .b import x\n"), "pkg.sub", True, modules)) == [("pkg.sub.b", 1, False)]
    succ = {"a": {"b"}, "b": {"a", "c"}, "c": set()}
    comps = strongly_connected(["a", "b", "c"], succ)
    assert comps == [["a", "b"]] and one_cycle(comps[0], succ) == ["a", "b", "a"]
