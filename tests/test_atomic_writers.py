"""Issue 16: every file the project writes goes through the one atomic writer (diffbir_core/atomic.py).

A static scan (``ast``) of diffbir_core/, diffbir_eval/, diffbir_demo/ and experiments/: a file is written only
* by `diffbir_core.atomic` itself (`write_text`, `write_bytes`, `atomic_open`, `atomic_path`), or
* by a library writer (``torch.save``, ``np.save``/``np.savez``, ``savefig``, PIL ``.save``, safetensors ``save_file``,
  ``download_url_to_file``) whose destination is the temporary path / file of an enclosing
  ``with atomic_path(...) as tmp`` / ``with atomic_open(...) as f`` (``tmp``, ``str(tmp)`` or ``f``);
* plain ``open(..., "w"/"a")``, ``Path.write_text/write_bytes``, ``os.replace``/``os.rename``/``shutil.move`` are
  refused, except the append-only logs listed in `APPEND_ONLY` (each row flushed, a torn last row skipped on read).
The scanner is checked on a known snippet, so the rule cannot pass vacuously.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("diffbir_core", "diffbir_eval", "diffbir_demo", "experiments")
ATOMIC = "diffbir_core/atomic.py"
# (file, enclosing function) -> why a non-atomic open is right there
APPEND_ONLY = {
    ("diffbir_eval/store.py", "append"): "RowStore: one JSON line per image, appended and fsync'ed",
    ("diffbir_core/train/loop.py", "write"): "_CsvLog: training log rows, appended and flushed",
    ("diffbir_eval/bench/__init__.py", "start"): "/proc/self/clear_refs: a kernel control file, not an output",
}
WRITERS = {"save", "savez", "savez_compressed", "savefig", "save_file", "download_url_to_file", "imwrite", "to_csv"}
PLAIN = {"write_text", "write_bytes"}
MOVES = {("os", "replace"), ("os", "rename"), ("shutil", "move"), ("shutil", "copyfile"), ("shutil", "copy")}


def _name(f: ast.AST) -> str:
    return f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")


def _mode(call: ast.Call, pos: int) -> str:
    args = [a for a in call.args[pos : pos + 1]] + [k.value for k in call.keywords if k.arg == "mode"]
    return next((a.value for a in args if isinstance(a, ast.Constant) and isinstance(a.value, str)), "r")


def scan(tree: ast.AST, rel: str) -> list[str]:
    """Every non-atomic write in ``tree`` as ``rel:line: what``."""
    bad: list[str] = []

    def visit(node: ast.AST, func: str, temps: frozenset[str]) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            func, temps = node.name, frozenset()
        if isinstance(node, ast.With):
            bound = {
                it.optional_vars.id
                for it in node.items
                if isinstance(it.context_expr, ast.Call)
                and _name(it.context_expr.func) in ("atomic_path", "atomic_open")
                and isinstance(it.optional_vars, ast.Name)
            }
            temps = temps | bound
        if isinstance(node, ast.Call):
            f, name = node.func, _name(node.func)
            where = f"{rel}:{node.lineno}"
            if isinstance(f, ast.Attribute) and name in PLAIN and _name(f.value) != "atomic":
                bad.append(f"{where}: Path.{name} (use diffbir_core.atomic.{name})")
            elif name == "open" and (rel, func) not in APPEND_ONLY:
                mode = _mode(node, 0 if isinstance(f, ast.Attribute) else 1)
                if any(c in mode for c in "wax+"):
                    bad.append(f"{where}: open(..., {mode!r}) (use diffbir_core.atomic.atomic_open)")
            elif isinstance(f, ast.Attribute) and (_name(f.value), name) in MOVES:
                bad.append(f"{where}: {_name(f.value)}.{name} (atomic_path does the replace, with fsync)")
            elif name in WRITERS:
                # destination: torch.save(obj, f), save_file(tensors, f), download_url_to_file(url, f); else first
                torch_save = name == "save" and isinstance(f, ast.Attribute) and _name(f.value) == "torch"
                second = torch_save or name in ("save_file", "download_url_to_file")
                pos = 1 if second else 0
                dest = node.args[pos] if len(node.args) > pos else None
                if isinstance(dest, ast.Call) and _name(dest.func) == "str" and dest.args:
                    dest = dest.args[0]
                if not (isinstance(dest, ast.Name) and dest.id in temps):
                    bad.append(f"{where}: {name}(...) not into the temporary of `with atomic_path/atomic_open`")
        for child in ast.iter_child_nodes(node):
            visit(child, func, temps)

    visit(tree, "", frozenset())
    return bad


def test_every_writer_is_atomic():
    files = [p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py")) if "__pycache__" not in p.parts]
    assert len(files) > 40
    bad = []
    for p in files:
        rel = p.relative_to(ROOT).as_posix()
        if rel != ATOMIC:
            bad += scan(ast.parse(p.read_text(encoding="utf-8")), rel)
    assert not bad, "files written without diffbir_core.atomic:\n  " + "\n  ".join(bad)


def test_append_only_exceptions_still_exist():
    """An exception for a function that is gone would silently widen the rule."""
    for (rel, func), _ in APPEND_ONLY.items():
        tree = ast.parse((ROOT / rel).read_text(encoding="utf-8"))
        assert any(isinstance(n, ast.FunctionDef) and n.name == func for n in ast.walk(tree)), (rel, func)


def test_scanner_on_a_known_snippet():
    src = (
        "def f(p, q, fig, sd):\n"
        "    p.write_text('x')\n"  # 2: plain write
        "    with open(p, 'w') as fh:\n"  # 3: plain open
        "        pass\n"
        "    with open(p) as fh:\n"  # reading is fine
        "        pass\n"
        "    os.replace(p, q)\n"  # 7: a move
        "    torch.save(sd, p)\n"  # 8: straight to the destination
        "    with atomic_path(p) as tmp:\n"
        "        torch.save(sd, tmp)\n"  # fine
        "        fig.savefig(str(tmp))\n"  # fine
        "    with atomic_open(q, 'wb') as fh:\n"
        "        np.save(fh, sd)\n"  # fine
        "    np.save(q, sd)\n"  # 14: outside the with
        "    write_text(p, 'x')\n"  # the atomic writer itself
        "    atomic.write_bytes(p, b'')\n"
        "    p.open('a')\n"  # 17: Path.open for appending
        "def g(tmp):\n"
        "    torch.save({}, tmp)\n"  # 19: a parameter named tmp is not an atomic temporary
    )
    got = [line.split(":")[1] for line in scan(ast.parse(src), "x.py")]
    assert got == ["2", "3", "7", "8", "14", "17", "19"]
