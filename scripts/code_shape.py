"""The house's shape figures (issue 35): string-key lookups per thousand lines, module and function
lengths, parameter counts. A plain AST pass over the two packages; prints one line per breach and a summary.

    python scripts/code_shape.py [--max_module 450 --max_function 60 --max_params 8]
"""

from __future__ import annotations

import argparse
import ast
from pathlib import Path

PACKAGES = ("compute_block_similarity", "slice_with_mergekit")
GROUP_SUFFIXES = ("Options", "Args", "Flags", "Run", "Output", "Config", "Settings")  # option groups travel whole


def string_keys(tree: ast.AST) -> int:
    """Subscripts by a string literal (``d["key"]``) and ``.get("key")`` calls."""
    n = 0
    for node in ast.walk(tree):
        if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant) and isinstance(node.slice.value, str):
            n += 1
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            n += 1
    return n


def loose_params(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Parameters other than self/cls and option groups (annotated with a *Options-like class)."""
    a = fn.args
    params = a.posonlyargs + a.args + a.kwonlyargs
    def is_group(p: ast.arg) -> bool:
        ann = ast.unparse(p.annotation) if p.annotation else ""
        return any(ann.split("|")[0].strip().endswith(s) for s in GROUP_SUFFIXES)
    return sum(1 for p in params if p.arg not in ("self", "cls") and not is_group(p))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--max_module", type=int, default=450, help="longest module, lines")
    p.add_argument("--max_function", type=int, default=60, help="longest function, lines")
    p.add_argument("--max_params", type=int, default=8, help="most loose parameters of one function")
    args = p.parse_args()
    root = Path(__file__).resolve().parents[1]
    lines = keys = 0
    breaches = []
    for pkg in PACKAGES:
        for f in sorted((root / pkg).glob("*.py")):
            src = f.read_text()
            tree = ast.parse(src)
            n = len(src.splitlines())
            lines += n
            keys += string_keys(tree)
            name = f.relative_to(root)
            if n > args.max_module:
                breaches.append(f"{name}: {n} lines")
            for node in ast.walk(tree):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    length = node.end_lineno - node.lineno + 1
                    if length > args.max_function:
                        breaches.append(f"{name}:{node.lineno} {node.name}: {length} lines")
                    if loose_params(node) > args.max_params:
                        breaches.append(f"{name}:{node.lineno} {node.name}: {loose_params(node)} parameters")
    print("\n".join(breaches))
    print(f"# {lines} lines, {keys} string-key lookups = {1000 * keys / lines:.1f} per thousand lines; "
          f"{len(breaches)} breaches of module <= {args.max_module}, function <= {args.max_function} lines, "
          f"<= {args.max_params} loose parameters")


if __name__ == "__main__":
    main()
