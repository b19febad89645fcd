"""Fetch real chest films that are not in ../shared, to check the ingest benchmark's figures on other films.

    .venv/bin/python benchmarks/outside_films.py /tmp/outside-films
    .venv/bin/python benchmarks/ingest.py --real --real-dir /tmp/outside-films

The only source reachable here is a package registry, and one package on PyPI ships real chest radiographs:
pneumonia-model-package 0.3.0 holds 16 paediatric chest JPEGs (968 to 1776 px wide; their names are those of the
Guangzhou paediatric set that Kermany et al. published, none of them among ../shared's Kermany samples). The package
states no licence for them: they are fetched for a benchmark on this machine, never added to the repository.
`pip download --no-deps` fetches its wheel without installing it or anything it needs.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "pneumonia-model-package==0.3.0"
WHEEL = "pneumonia_model_package-0.3.0-py3-none-any.whl"
FILMS = "pneumonia_model_package/datasets/pneumonia-data/val/"


def fetch(dest: Path) -> list[Path]:
    """The package's chest JPEGs, written flat into `dest` (made if missing); files already there are kept."""
    with tempfile.TemporaryDirectory(prefix="cxr-outside-films-") as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary", ":all:",
                        "--dest", tmp, PACKAGE], check=True)
        with zipfile.ZipFile(Path(tmp) / WHEEL) as wheel:
            names = [name for name in wheel.namelist() if name.startswith(FILMS) and name.endswith(".jpeg")]
            dest.mkdir(parents=True, exist_ok=True)
            for name in names:
                (dest / Path(name).name).write_bytes(wheel.read(name))
    return sorted(dest / Path(name).name for name in names)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dest", type=Path, help="folder to write the films into")
    films = fetch(parser.parse_args().dest)
    if not films:
        raise SystemExit(f"{WHEEL} held no JPEGs under {FILMS}: the package changed")
    print(f"{len(films)} chest JPEGs in {films[0].parent}")


if __name__ == "__main__":
    main()
