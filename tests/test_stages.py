"""The stage table is the one list of stages: dvc.yaml must agree with it, and each stage writes what it declares."""

import ast
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml

from pipeline.config import Config, Section
from pipeline.paths import ProjectPaths
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


# Params that change how fast a stage runs, where it reports or the modes of the files it writes (privacy.umask,
# applied by Stage.run), never what it writes: no stage depends on them.
NOT_SHAPING = ("data.num_workers", "data.checkpoint_every", "orchestration", "privacy")


@contextmanager
def _params_read(config: Config) -> Iterator[set[str]]:
    """Every param (`section.key`, as params.yaml spells it) read from `config` while inside: each read of a field
    of one of its sections is recorded, and a section dumped whole (model_dump) counts as all of its keys."""
    where: dict[int, str] = {}

    def walk(node: Section, key: str) -> None:
        where[id(node)] = key
        for name, info in type(node).model_fields.items():
            child_key = f"{key}.{info.alias or name}" if key else (info.alias or name)
            value = object.__getattribute__(node, name)
            for item in value if isinstance(value, (list, tuple)) else [value]:
                if isinstance(item, Section):
                    walk(item, child_key)

    walk(config, "")
    read: set[str] = set()

    def recording(self, name: str):
        value = object.__getattribute__(self, name)
        key = where.get(id(self))
        fields = type(self).model_fields
        if key is not None and name in fields and not isinstance(value, Section):
            alias = fields[name].alias or name
            read.add(f"{key}.{alias}" if key else alias)
        return value

    dump = Section.model_dump

    def dumping(self, *args, **kwargs):
        key = where.get(id(self))
        if key:  # (the whole config dumped is every param logged for the record: MLflow, the params hash)
            fields = type(self).model_fields
            read.update(f"{key}.{fields[name].alias or name}" for name in fields if name not in kwargs.get("exclude", ()))
        return dump(self, *args, **kwargs)

    Section.__getattribute__ = recording
    Section.model_dump = dumping
    try:
        yield read
    finally:
        del Section.__getattribute__
        del Section.model_dump


def _covered(key: str, declared: list[str]) -> bool:
    return any(key == entry or key.startswith(entry + ".") for entry in [*declared, *NOT_SHAPING])


# Files a stage may read without declaring them: caches that change how fast it runs, never what it writes, the
# MLflow store (the tracking server's, outside DVC), the project lock, params.yaml (declared key by key), the
# project-scope de-identification key (a secret: never tracked; a new key makes ingest refuse or rotate, see
# README) and the erasure record (a new project has none, and DVC refuses a missing dep; `cxr forget` rewrites
# ingest's outputs whenever it appends to it, so DVC reruns ingest anyway).
UNDECLARED_READS = ("data/cache", "mlruns.db", "mlruns", "mlartifacts", ".cxr.lock", ".cxr.lock.owner", "params.yaml",
                    ".cxr/deid.key", "data/erasures.jsonl")


def _declares(path: Path, entries: list[str]) -> bool:
    return any(path == Path(entry) or Path(entry) in path.parents for entry in entries)


def test_each_dvc_stage_declares_every_param_and_file_it_reads(tmp_path):
    """Each stage run for real on a tiny project, every param it reads and every project file it opens recorded:
    dvc.yaml must list each param (or its section) and each file (or a folder above it), or a change would leave
    the stage's outputs stale under `dvc repro`. A file the stage also writes counts as declared (DVC's
    `persist: true`, or rewritten from scratch)."""
    from pipeline.config import load_config
    from tests.conftest import write_tiny_project
    from tests.file_access import files_opened

    params = write_tiny_project(tmp_path, n=60)
    config, paths, dvc = load_config(params), ProjectPaths(tmp_path), _dvc_stages()
    gaps = {}
    for each in STAGES:
        with _params_read(config) as read, files_opened(tmp_path) as opened:
            each.run(paths, config)
        assert read and opened, f"recorded nothing read by {each.name}: the recording is broken"
        declared = dvc[each.name]
        missing = sorted(key for key in read if not _covered(key, declared.get("params", [])))
        inputs = [*declared["deps"], *each.outputs, *UNDECLARED_READS]
        missing += sorted({str(path) for path, reading in opened if reading and not _declares(path, inputs)})
        if missing:
            gaps[each.name] = missing
    assert not gaps, f"dvc.yaml stages miss the params and files they read: {gaps}"


def test_the_registered_model_carries_every_module_its_serving_code_imports():
    """A registered model runs on copies of pipeline.register.SERVING_MODULES alone (no project installed). A module
    the serving code imports, at the top or inside a function, that is missing from them fails only when a request
    reaches that function: a JPEG's opener (pipeline.film_jpeg) left out would refuse every JPEG a hospital sends."""
    from pipeline.register import SERVING_MODULES

    package = REPO / "pipeline"
    carried = {package / module for module in SERVING_MODULES}
    # `cxr monitor`'s side of pipeline.monitoring reads the project's MLflow store (tracking, and the files and
    # paths it reads): the served model only appends to the log, and never calls it.
    project_side = {package / module for module in ("tracking.py", "files.py", "paths.py")}
    needed = closure(package / "mlflow_model.py") | closure(package / "serving.py")
    missing = sorted(str(path.relative_to(REPO)) for path in needed - project_side
                     if path not in carried and not any(folder in path.parents for folder in carried))
    assert not missing, f"SERVING_MODULES lacks {missing}"
