"""The core's layering: no import cycles between its modules (local imports included), no import
of the built-in plugins, and its size cap (code lines without blanks, comments, docstrings)."""
from __future__ import annotations

import ast
import io
import tokenize
from pathlib import Path

import discon_core

CORE = Path(discon_core.__file__).parent
# 2,200 until the Hub downloads (trust on first use, rank-0 barrier) and pipeline folders
# (from_pretrained / save_pretrained) joined the core: I/O every plugin relies on
MAX_CORE_LINES = 2500


def _imports(path: Path) -> set[str]:
    """discon_core modules and top-level packages that ``path`` imports, anywhere in the file."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative: "from . import hooks", "from .registry import build"
                out |= {f"discon_core.{a.name}" for a in node.names} if not node.module \
                    else {f"discon_core.{node.module}"}
            elif node.module:
                out.add(node.module)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
    return out


def _graph() -> dict[str, set[str]]:
    modules = {f"discon_core.{p.stem}": p for p in CORE.glob("*.py") if p.stem != "__init__"}
    return {m: {i for i in _imports(p) if i in modules and i != m} for m, p in modules.items()}


def test_core_modules_have_no_import_cycles():
    graph, state, cycles = _graph(), {}, []

    def visit(m: str, path: list[str]) -> None:
        state[m] = "open"
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                cycles.append(path[path.index(n):] + [n])
            elif n not in state:
                visit(n, path + [n])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, f"import cycles in discon_core: {cycles}"
    assert graph["discon_core.train"] and "discon_core.cli" not in graph["discon_core.train"]


def test_core_never_imports_the_plugins():
    offenders = {p.name: sorted(i for i in _imports(p) if i.startswith("discon_plugins"))
                 for p in CORE.glob("*.py")}
    assert not {k: v for k, v in offenders.items() if v}


def _code_lines(path: Path) -> int:
    src = path.read_text()
    docs = set()
    for node in ast.walk(ast.parse(src)):
        body = getattr(node, "body", None)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) \
                and body and isinstance(body[0], ast.Expr) \
                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
            docs.update(range(body[0].lineno, body[0].end_lineno + 1))
    skip = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
            tokenize.ENDMARKER}
    code = set()
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type not in skip:
            code.update(range(tok.start[0], tok.end[0] + 1))
    return len(code - docs)


def test_code_line_counter_skips_blanks_comments_and_docstrings(tmp_path):
    f = tmp_path / "m.py"
    f.write_text('"""Doc\nstring."""\n\n# comment\ndef f(x):\n    """Doc."""\n    return (x +\n'
                 '            1)  # trailing\n')
    assert _code_lines(f) == 3  # def, and the two lines of the return


def test_core_stays_small():
    total = sum(_code_lines(p) for p in CORE.glob("*.py"))
    assert total <= MAX_CORE_LINES, (f"discon_core has {total} lines of code (cap "
                                     f"{MAX_CORE_LINES}); move model-specific pieces to plugins")
