"""The shape of eval/ and bench/: short files and functions, no import circle, no export file names (the
export contract belongs to adapt/checkpoint.py), and one `main` for every eval script (eval.cli)."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FILES = sorted([*(ROOT / "eval").rglob("*.py"), *(ROOT / "bench").glob("*.py")])
EXPORT_NAMES = ("diffusion.json", "recipe.yaml", "adapter")


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), str(path))


def test_files_and_functions_are_short():
    long_files = [f"{p.relative_to(ROOT)}: {n}" for p in FILES if (n := len(p.read_text().splitlines())) > 450]
    long_functions = [f"{p.relative_to(ROOT)}:{node.lineno} {node.name}: {node.end_lineno - node.lineno + 1}"
                      for p in FILES for node in ast.walk(_tree(p))
                      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                      and node.end_lineno - node.lineno + 1 > 60]
    assert not long_files and not long_functions, long_files + long_functions


def _docstrings(tree: ast.Module) -> set[int]:
    nodes = [tree, *(n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)))]
    return {id(n.body[0].value) for n in nodes if n.body and isinstance(n.body[0], ast.Expr)
            and isinstance(n.body[0].value, ast.Constant)}


def test_no_export_file_name_is_spelled_outside_checkpoint():
    found = []
    for path in FILES:
        tree = _tree(path)
        docs = _docstrings(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
                if any(name in node.value for name in EXPORT_NAMES[:2]) or node.value == EXPORT_NAMES[2]:
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.value!r}")
    assert not found, found


def _eval_imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("eval"):
            out |= {node.module} if node.module != "eval" else {f"eval.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("eval.")}
    return out


def test_no_import_circle_in_eval():
    modules = {".".join(p.relative_to(ROOT).with_suffix("").parts): p for p in (ROOT / "eval").rglob("*.py")}
    graph = {name: {m for m in _eval_imports(p) if m in modules} for name, p in modules.items()}
    state: dict[str, str] = {}

    def visit(name: str, path: list[str]) -> None:
        state[name] = "open"
        for dep in graph[name]:
            assert state.get(dep) != "open", " -> ".join(path + [name, dep])
            if dep not in state:
                visit(dep, path + [name])
        state[name] = "done"

    for name in graph:
        if name not in state:
            visit(name, [])


def test_every_eval_script_shares_the_one_main():
    """A module with a `__main__` block that takes a model or samples is a Script run by eval.cli.run_script."""
    own_main = {"eval/harness.py", "eval/report.py", "eval/tasks/make_data.py"}  # lm-eval's CLI; a folder; task data
    for path in (ROOT / "eval").rglob("*.py"):
        text, rel = path.read_text(), str(path.relative_to(ROOT))
        if '__name__ == "__main__"' in text and rel not in own_main:
            assert "SCRIPT = Script(" in text and "run_script(SCRIPT, argv)" in text, rel
