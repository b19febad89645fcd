"""The stage table is the one list of stages: dvc.yaml must agree with it, and each stage writes what it declares."""

import ast
from pathlib import Path

import yaml

from pipeline.stages import STAGES, stage
from tests.conftest import REPO

DVC_ONLY = ("demo_data",)  # DVC also writes the demo data set; the flow and `cxr <stage>` never do


def _dvc_stages() -> dict:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def _declared(entries: list) -> set[str]:
    """Paths of a dvc.yaml list whose items are a path or {path: options}."""
    return {next(iter(entry)) if isinstance(entry, dict) else entry for entry in entries or []}


def test_dvc_yaml_runs_the_stage_table_in_order_with_its_commands():
    dvc = _dvc_stages()
    assert list(dvc) == [*DVC_ONLY, *(each.name for each in STAGES)]
    for each in STAGES:
        assert dvc[each.name]["cmd"] == each.command == f"cxr {each.name}"


def test_dvc_yaml_declares_exactly_the_outputs_of_each_stage():
    dvc = _dvc_stages()
    for each in STAGES:
        written = _declared(dvc[each.name].get("outs")) | _declared(dvc[each.name].get("metrics")) \
            | _declared(dvc[each.name].get("plots"))
        assert written == set(each.outputs), each.name


def _imports(tree: ast.AST):
    """Every import statement, at the top or inside functions, but not those only type checkers read."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        yield from _imports(node)


def _imported_modules(module: Path) -> set[Path]:
    """The project files `module` imports (pipeline.x, or a package's files)."""
    found = set()
    for node in _imports(ast.parse(module.read_text())):
        names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        for name in names:
            if not name.startswith("pipeline."):
                continue
            path = REPO / Path(*name.split("."))
            if path.with_suffix(".py").is_file():
                found.add(path.with_suffix(".py"))
            elif (path / "__init__.py").is_file():
                found |= set(path.glob("*.py"))
    return found


def closure(module: Path) -> set[Path]:
    """`module` and every project file it imports, directly or through others."""
    seen, todo = set(), [module]
    while todo:
        current = todo.pop()
        if current not in seen:
            seen.add(current)
            todo += _imported_modules(current)
    return seen


def test_each_dvc_stage_depends_on_all_the_code_it_runs():
    """A change to any module a stage imports (directly or not) must rerun the stage under `dvc repro`."""
    dvc = _dvc_stages()
    for each in STAGES:
        module = REPO / Path(*each.run.__module__.split(".")).with_suffix(".py")
        deps = [REPO / dep for dep in dvc[each.name]["deps"]]
        covered = {path for path in closure(module) if any(path == dep or dep in path.parents for dep in deps)}
        missing = sorted(str(path.relative_to(REPO)) for path in closure(module) - covered
                         if path.name != "__init__.py")
        assert not missing, f"dvc.yaml stage {each.name} misses deps {missing}"


def test_every_stage_wrote_every_output_it_declares(tiny_project):
    for each in STAGES:
        for output in each.outputs:
            assert (tiny_project.paths.root / output).exists(), f"{each.name} did not write {output}"


def test_an_unknown_stage_name_is_a_one_line_error():
    import pytest

    from pipeline.errors import CxrError

    with pytest.raises(CxrError, match="no stage named 'trian'; the stages are ingest, validate"):
        stage("trian")
