"""Package code lines per module: lines holding code, not blank, comment-only or inside a
docstring (issue 30's measure). Usage: python benchmarks/code_lines.py [kd_mlflow]"""

from __future__ import annotations

import ast
import io
import sys
import tokenize
from pathlib import Path

_DOC_OWNERS = (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
_NOT_CODE = (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER)


def _docstring_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None) if isinstance(node, _DOC_OWNERS) else None
        first = body[0] if body else None
        if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
            lines.update(range(first.lineno, (first.end_lineno or first.lineno) + 1))
    return lines


def code_lines(path: Path) -> int:
    source = path.read_text()
    docs = _docstring_lines(ast.parse(source))
    lines: set[int] = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type not in _NOT_CODE:
            lines.update(n for n in range(tok.start[0], tok.end[0] + 1) if n not in docs)
    return len(lines)


def main(root: str = "kd_mlflow") -> None:
    counts = {str(p.relative_to(root)): code_lines(p) for p in sorted(Path(root).rglob("*.py"))}
    for name, n in counts.items():
        print(f"{name:20s} {n:5d}")
    print(f"{'total':20s} {sum(counts.values()):5d}")


if __name__ == "__main__":
    main(*sys.argv[1:])
