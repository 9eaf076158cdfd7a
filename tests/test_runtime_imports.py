"""The runtime does not load the fixtures and demo: ``automodel.twins`` and ``automodel.demo``
are imported only by the CLI commands that offer them, the examples' ``prepare:`` targets, tests,
benchmarks and scripts."""

from __future__ import annotations

import ast

from tests.conftest import ROOT, run_python

PACKAGE = ROOT / "automodel"
APART = ("automodel.twins", "automodel.demo")
# The commands that offer the twins and the demo (models make-tiny, data make-receipts).
ALLOWED_IMPORTERS = ("automodel.cli",)


def _module_name(path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def test_importing_the_datasets_does_not_import_the_demo_or_the_twins():
    result = run_python(
        "import sys, automodel.datasets, automodel.datasets.vlm\n"
        f"loaded = sorted(m for m in sys.modules if m.startswith({APART!r}))\n"
        "assert not loaded, loaded\n"
    )
    assert result.returncode == 0, result.stderr


def test_no_runtime_source_imports_the_demo_or_the_twins_even_lazily():
    # Read from the source, so imports inside functions count as well as those at the top.
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = _module_name(path)
        if _within(module, APART + ALLOWED_IMPORTERS):
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            else:
                continue
            if any(_within(name, APART) for name in names):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not offenders, f"runtime modules importing automodel.twins / automodel.demo: {offenders}"
