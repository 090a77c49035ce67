"""The layout's rules, checked on the import graph (every import counts, lazy ones too).

    etl/core/        the shared core: imports nothing else of etl
    etl/download/    ┐
    etl/read/        │ the stages: each imports only itself and etl.core
    etl/transform/   │
    etl/write/       ┘
    etl/run/         run machinery: core and run; only run/pipeline.py wires stages
    etl/ops/         the operator surface beside the CLI
    etl/api.py, etl/cli.py   the entry points

Also: no import cycle, every stage module states its queue contract, and every module has
a test file where the tree says it should be.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("download", "read", "transform", "write")
WIRING = "etl.run.pipeline"


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted((ROOT / "etl").rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def imports() -> dict[str, set[str]]:
    """Module -> the etl modules it imports, wherever the import stands."""
    mods = modules()
    graph: dict[str, set[str]] = defaultdict(set)
    for name, path in mods.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            for target in targets:
                while target and target not in mods:
                    target = target.rpartition(".")[0]
                if target and target != name and target.startswith("etl"):
                    graph[name].add(target)
    # ``_WHERE`` in etl/__init__.py names what its lazy __getattr__ imports
    init = ast.parse(mods["etl"].read_text(encoding="utf-8"))
    for node in ast.walk(init):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in mods:
            graph["etl"].add(node.value)
    return graph


def package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and (ROOT / "etl" / parts[1]).is_dir()) else ""


def test_there_is_no_import_cycle() -> None:
    graph = imports()
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for node in sorted(modules()):
        if node not in state:
            visit(node, [node])
    assert cycles == []


def test_the_core_imports_only_the_core() -> None:
    bad = {m: sorted(t for t in ts if package(t) != "core") for m, ts in imports().items() if package(m) == "core"}
    assert {m: ts for m, ts in bad.items() if ts} == {}


@pytest.mark.parametrize("stage", STAGES)
def test_a_stage_imports_only_itself_and_the_core(stage: str) -> None:
    allowed = {stage, "core"}
    bad = {m: sorted(t for t in ts if package(t) not in allowed) for m, ts in imports().items() if package(m) == stage}
    assert {m: ts for m, ts in bad.items() if ts} == {}


def test_only_the_pipeline_wires_stages_together() -> None:
    graph = imports()
    wiring = {
        m for m, ts in graph.items() if package(m) not in STAGES and len({package(t) for t in ts} & set(STAGES)) > 1
    }
    assert wiring == {WIRING}


def test_run_machinery_besides_the_pipeline_imports_no_stage() -> None:
    bad = {
        m: sorted(t for t in ts if package(t) in STAGES)
        for m, ts in imports().items()
        if package(m) == "run" and m != WIRING
    }
    assert {m: ts for m, ts in bad.items() if ts} == {}


@pytest.mark.parametrize("stage", STAGES)
def test_each_stage_states_its_queue_contract(stage: str) -> None:
    doc = ast.get_docstring(ast.parse((ROOT / "etl" / stage / "stage.py").read_text(encoding="utf-8"))) or ""
    for term in ("**In**", "**Out**", "**Bound**", "**End of stream**"):
        assert term in doc, f"etl/{stage}/stage.py's docstring does not say {term}"


def test_every_module_has_its_test_file() -> None:
    missing = []
    for name, path in modules().items():
        rel = path.relative_to(ROOT / "etl")
        if rel.name in ("__init__.py", "__main__.py"):
            continue
        test = ROOT / "tests" / rel.parent / f"test_{rel.name}"
        if not test.is_file():
            missing.append(f"{name}: {test.relative_to(ROOT)}")
    assert missing == []
