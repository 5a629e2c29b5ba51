"""The planning core is pure policy: importing it pulls in no torch, no dask, and reads no clock."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import elastic_llm.planning

PACKAGE = Path(elastic_llm.planning.__file__).parent
ALLOWED_ROOTS = {"__future__", "abc", "bisect", "collections", "dataclasses", "enum", "functools",
                 "heapq", "itertools", "json", "math", "os", "pathlib", "typing", "numpy", "scipy"}
ALLOWED_PROJECT = ("elastic_llm.planning", "elastic_llm.model.spec", "elastic_llm.errors")


def test_modules_import_only_stdlib_numpy_scipy_and_pure_project_modules() -> None:
    for path in PACKAGE.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                ok = name.split(".")[0] in ALLOWED_ROOTS or name.startswith(ALLOWED_PROJECT)
                assert ok, f"{path.name} imports {name}"
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                assert (node.value.id, node.attr) not in {("time", "time"), ("time", "monotonic"),
                                                          ("datetime", "now")}, path.name


def test_importing_the_package_loads_no_torch_or_dask() -> None:
    code = ("import sys, elastic_llm.planning; "
            "bad = [m for m in ('torch', 'dask', 'distributed') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
