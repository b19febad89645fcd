"""Sources DVC cannot see. `dvc repro` reruns a stage only when one of its declared deps changed, and dvc.yaml can
only name fixed paths: a source that params.yaml points at outside them (`data.sources` or `evaluate.external`
elsewhere on disk) could change without the stage ever running again. So when DVC runs a stage (it sets
DVC_STAGE and DVC_ROOT for the command), every source the stage reads must lie under one of that stage's deps;
otherwise the stage refuses in one line. Run directly (`cxr ingest`, `cxr pipeline`) nothing is checked: those
always run. Reads dvc.yaml as YAML only; no DVC import.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from pipeline.errors import CxrError


def check_sources_watched(root: Path, sources: list[str], key: str) -> None:
    """Refuse a source outside the deps dvc.yaml declares for the stage DVC is running (none when DVC is not)."""
    addressing = os.environ.get("DVC_STAGE")
    if not addressing or not sources:
        return
    dvc_file, _, name = addressing.rpartition(":")
    dvc_root = Path(os.environ.get("DVC_ROOT") or root)
    dvc_yaml = dvc_root / (dvc_file or "dvc.yaml")
    try:
        stage = yaml.safe_load(dvc_yaml.read_text())["stages"][name]
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return  # not a stage this project declares (a user's own dvc.yaml): nothing to check against
    watched = [(dvc_yaml.parent / _path_of(dep)).resolve() for dep in stage.get("deps") or []]
    for source in sources:
        where = (Path(root) / source).resolve()
        if not any(where == dep or dep in where.parents for dep in watched):
            data_deps = ", ".join(_path_of(dep) for dep in stage.get("deps") or [] if not _path_of(dep).startswith("pipeline"))
            raise CxrError(f"{key} '{source}' lies outside every dependency dvc.yaml declares for stage {name} "
                           f"({data_deps}): `dvc repro` would not rerun {name} when its films change; move it under "
                           f"data/raw (or `dvc import` it there), or add it to the deps of {name} in dvc.yaml")


def _path_of(dep: str | dict) -> str:
    return next(iter(dep)) if isinstance(dep, dict) else dep
