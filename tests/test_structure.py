"""The shape of the code: no import circle, files and functions short enough to read at once, lines ruff accepts
(pyproject.toml's [tool.ruff]), only the export package's contract (adapt/export/contract.py) spelling the names of
an export's files, and one `main` for every eval script."""
from __future__ import annotations

import ast
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

PACKAGES = ("adapt", "eval", "bench")
# ruff checks each line's width; these caps stay so that a file, and a function, is short enough to read at once
MAX_FILE_LINES, MAX_FUNCTION_LINES = 400, 60
# the decoder shipped inside every export runs without this package, so it reads diffusion.json itself
EXPORT_NAME_OWNERS = {"adapt/export/contract.py", "adapt/export/hf_generate/generate.py"}
# file names as strings; the adapter folder only where it is joined to a path ("adapter" is also a lora.export value)
EXPORT_NAMES = re.compile(r"""["'](diffusion\.json|recipe\.yaml)["']|/ *["']adapter["']|["']adapter/""")


def sources() -> dict[str, Path]:
    """module name -> file, for every module of the packages."""
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):  # bench/ holds scripts, named bench.<file> here
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules `name` imports anywhere in its file (module level or inside functions)."""
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        found |= {t for t in targets if t in known and t != name}
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_circle():
    mods = sources()
    graph = {name: imports(name, path, set(mods)) for name, path in mods.items()}
    # a package importing its own submodules is not a circle; a submodule importing its package is
    for name in graph:
        graph[name] = {m for m in graph[name] if not m.startswith(name + ".")}
    assert find_cycle(graph) is None, f"import circle: {' -> '.join(find_cycle(graph))}"
    assert find_cycle({"a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]  # the check can fail


def test_files_and_functions_are_short():
    long_files, long_functions = [], []
    for path in sources().values():
        text = path.read_text()
        if text.count("\n") > MAX_FILE_LINES:
            long_files.append(f"{path.relative_to(ROOT)}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long_functions.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {n} lines")
    assert not long_files, long_files
    assert not long_functions, long_functions


def test_ruff_is_clean():
    """`ruff check` (pyproject.toml's [tool.ruff]: 120 columns, pyflakes and pycodestyle) passes on all the code."""
    if importlib.util.find_spec("ruff") is None:
        pytest.fail("ruff is not installed (it is one of the test dependencies); run scripts/setup.sh")
    out = subprocess.run([sys.executable, "-m", "ruff", "check", "adapt", "eval", "bench", "tests"], cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 0, f"ruff check failed:\n{out.stdout}{out.stderr}"


def test_only_the_export_contract_spells_export_file_names():
    spelled = [f"{path.relative_to(ROOT)}: {m.group(0)}" for path in sources().values()
               if str(path.relative_to(ROOT)) not in EXPORT_NAME_OWNERS
               for m in EXPORT_NAMES.finditer(path.read_text())]
    assert not spelled, spelled
    assert EXPORT_NAMES.search((ROOT / "adapt" / "export" / "contract.py").read_text())  # the pattern matches the owner


def test_every_eval_script_shares_the_one_main():
    """A module with a `__main__` block that takes a model or samples is a Script run by eval.cli.run_script."""
    own_main = {"eval/harness.py", "eval/report.py", "eval/tasks/make_data.py"}  # lm-eval's CLI; a folder; task data
    for path in (ROOT / "eval").rglob("*.py"):
        text, rel = path.read_text(), str(path.relative_to(ROOT))
        if '__name__ == "__main__"' in text and rel not in own_main:
            assert "SCRIPT = Script(" in text and "run_script(SCRIPT, argv)" in text, rel


def top_level_names(path: Path) -> set[str]:
    """The functions and classes a file defines at its top level."""
    tree = ast.parse(path.read_text())
    return {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}


def test_the_library_and_the_shipped_decoder_share_each_primitive_once():
    """Each decoding primitive the library's samplers and the decoder shipped in every export share is written once,
    in the shipped files (self-contained: torch, transformers, the standard library and each other only), and
    imported by the library. `generate` is exempt: transformers calls the shipped one by that name, the library's is
    its own entry."""
    from adapt.export.writer import SHIPPED

    library = sorted((ROOT / "adapt" / "decode").glob("*.py"))
    shipped = set().union(*(top_level_names(p) for p in SHIPPED))
    twice = {f"{p.relative_to(ROOT)}: {name}" for p in library
             for name in (top_level_names(p) & shipped) - {"generate"}}
    assert not twice, f"defined both in the shipped decoder and in the library: {sorted(twice)}"
    for path in SHIPPED:
        nodes = list(ast.walk(ast.parse(path.read_text())))
        imports = {a.name.split(".")[0] for n in nodes if isinstance(n, ast.Import) for a in n.names}
        imports |= {(n.module or "").split(".")[0] for n in nodes if isinstance(n, ast.ImportFrom) and not n.level}
        siblings = {n.module for n in nodes if isinstance(n, ast.ImportFrom) and n.level}
        assert imports <= {"__future__", "dataclasses", "inspect", "json", "math", "os", "torch", "transformers"}, \
            imports
        assert siblings <= {p.stem for p in SHIPPED}, siblings


COMMANDS = {"adapt.run", "adapt.sample", "adapt.prepare", "adapt.estimate", "adapt.curve"}
"""Modules run as commands (`python -m ...`); a package's `__main__` is one too."""
FORBIDDEN = [  # (importer prefix, imported prefix): arrows that would point up the flow recipe -> export -> decoding
    ("adapt.cli", "adapt.train.loop"),
    ("adapt.export", "adapt.draft_head"),
    ("adapt.export", "adapt.serve"),
    ("adapt.decode", "adapt.train"),
    ("adapt.decode", "adapt.serve"),
    ("adapt.objectives", "adapt.train"),
    ("adapt.objectives", "adapt.export"),
    ("adapt.objectives", "adapt.decode"),
    ("adapt.model", "adapt.train"),
    ("adapt.model", "adapt.decode"),
    ("adapt.data", "adapt.decode"),
    ("adapt.draft_head", "adapt.serve"),
]


def _arrows() -> list[tuple[str, str]]:
    mods = sources()
    return [(name, target) for name, path in mods.items() for target in imports(name, path, set(mods))]


def _is_command(name: str) -> bool:
    return name in COMMANDS or name.endswith(".__main__")


def test_no_upward_arrow():
    """Library modules import no command, and none of the forbidden arrows exists."""
    arrows = _arrows()
    up = [f"{a} -> {b}" for a, b in arrows if _is_command(b) and not _is_command(a) and not b.startswith(a + ".")]
    up += [f"{a} -> {b}" for a, b in arrows for low, high in FORBIDDEN
           if (a == low or a.startswith(low + ".")) and (b == high or b.startswith(high + "."))]
    assert not up, up
