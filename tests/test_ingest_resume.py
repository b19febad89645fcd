"""An ingest that stops partway keeps what it decoded, and files that change while ingest runs leave nothing false
in the decode cache: real `cxr ingest` processes killed or interrupted by signals, real files moved and rewritten."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from pipeline.config import load_config
from pipeline.decode_cache import CACHE_VERSION
from pipeline.deid import load_key
from pipeline.demo_data import write_demo_data
from pipeline.imaging import limits_of
from pipeline.ingest import PixelSpool, decode_items, finish_ingest, ingest_stage, plan_ingest
from pipeline.paths import ProjectPaths

CXR = Path(sys.executable).parent / "cxr"
# Runs a command as a shell in a terminal does, with SIGINT at its default whatever this process has. An ignored
# signal is inherited through exec, and in 3 of 7 long test runs a `cxr ingest` started from here ignored SIGINT
# (it went on to exit 0) while this process's Python handler was the default one: something in a long test run
# ignores it at the C level for a while (C's system(), for one, does so in its whole process while its command runs).
AS_FROM_A_TERMINAL = [sys.executable, "-c", "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
                      "os.execv(sys.argv[1], sys.argv[1:])"]
EVERY = 10  # data.checkpoint_every in these tests


def _outputs(paths: ProjectPaths) -> tuple[bytes, ...]:
    return paths.manifest.read_bytes(), paths.images.read_bytes(), paths.quarantine.read_bytes()


def _project(root: Path, workers: int = 1) -> tuple[ProjectPaths, object]:
    params = root / "params.yaml"
    params.write_text(f"data:\n  image_size: 32\n  num_workers: {workers}\n  checkpoint_every: {EVERY}\n")
    return ProjectPaths(root), load_config(params)


def _slow_source(root: Path, workers: int) -> int:
    """A demo set of large films, its PNG and JPEG films also as byte-distinct copies (bytes after the film's end),
    so that decoding takes about a second on `workers` processes: time to stop it partway. How many files it holds."""
    source = root / "data" / "raw" / "demo"
    write_demo_data(source, n=12, seed=5, size=768)
    for film in [p for p in source.rglob("*") if p.suffix in (".png", ".jpg") and not p.name.startswith("broken")]:
        for copy in range(workers * (60 if film.suffix == ".png" else 20)):  # a PNG is decoded in full, a JPEG at 1/4
            (film.parent / f"{film.stem}-copy{copy}{film.suffix}").write_bytes(film.read_bytes() + f"copy {copy}".encode())
    return sum(1 for p in source.rglob("*") if p.is_file() and p.name != "README.md")


def _cache_index(paths: ProjectPaths) -> Path:
    """Where the decode cache's index is. Not through DecodeCache, which reads it: a reader beside a writer may see
    a file replaced between pyarrow's stat and its read (ingest holds the project lock; this test does not)."""
    return paths.decode_cache / f"decoded-32px-v{CACHE_VERSION}" / "index.parquet"


@pytest.mark.parametrize(("stop", "workers"), [(signal.SIGKILL, 1), (signal.SIGINT, 2)], ids=["killed", "ctrl-c"])
def test_an_ingest_stopped_partway_keeps_what_it_decoded_and_the_next_one_decodes_only_the_rest(tmp_path, stop, workers):
    n_files = _slow_source(tmp_path / "stopped", workers)
    shutil.copytree(tmp_path / "stopped", tmp_path / "whole")
    paths, config = _project(tmp_path / "stopped", workers)
    whole_paths, whole_config = _project(tmp_path / "whole", workers)
    whole = ingest_stage(whole_paths, whole_config)  # never stopped: what the stopped one must end up writing

    run = subprocess.Popen([*AS_FROM_A_TERMINAL, str(CXR), "ingest", "--params", str(paths.root / "params.yaml")],
                           cwd=paths.root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           start_new_session=True)
    deadline = time.monotonic() + 120
    while not _cache_index(paths).exists() and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)  # the first checkpoint: EVERY films in the cache
    os.killpg(run.pid, signal.SIGSTOP)  # held where the poll found it: it cannot end before the signal
    assert run.poll() is None, f"the ingest ended before it could be stopped: {run.communicate()}"
    if stop == signal.SIGINT:
        os.killpg(run.pid, stop)  # as Ctrl-C in a terminal: the decode workers get it too
    else:
        run.send_signal(stop)  # as the out-of-memory killer: the main process only
    os.killpg(run.pid, signal.SIGCONT)  # Ctrl-C acts once they run again
    out, err = run.communicate(timeout=120)

    kept = len(pd.read_parquet(_cache_index(paths)))
    assert EVERY <= kept < n_files - EVERY, (run.returncode, err[-2000:])  # stopped partway, after a checkpoint
    assert not paths.manifest.exists()  # nothing half-written: finish never ran
    if stop == signal.SIGKILL:
        assert run.returncode == -signal.SIGKILL
    else:  # Ctrl-C: the films decoded since the last checkpoint are saved too, and the user is told so
        assert run.returncode == 130, err
        assert "Traceback" not in err
        assert "stopped after decoding" in err and "the next ingest decodes only the other" in err

    resumed = ingest_stage(paths, config)

    assert resumed.n_decoded <= n_files - kept < whole.n_decoded  # what was kept is not decoded again
    assert _outputs(paths) == _outputs(whole_paths)  # and the outputs are those of the ingest never stopped
    assert resumed.quarantine_reasons == whole.quarantine_reasons


def test_checkpoint_every_0_caches_only_at_the_end_and_changes_no_output(tmp_path):
    write_demo_data(tmp_path / "a" / "data" / "raw" / "demo", n=30, seed=2, size=64)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    paths_a, config_a = _project(tmp_path / "a")
    paths_b, _ = _project(tmp_path / "b")
    config_b = load_config(paths_b.root / "params.yaml", ["data.checkpoint_every=0"])
    ingest_stage(paths_a, config_a)
    ingest_stage(paths_b, config_b)
    assert _outputs(paths_a) == _outputs(paths_b)
    shards = [sorted(p.name for p in _cache_index(paths).parent.glob("shard-*.npy")) for paths in (paths_a, paths_b)]
    assert len(shards[0]) > 1 and len(shards[1]) == 1  # a shard a checkpoint, against one at the end


def _decode_and_finish(paths: ProjectPaths, config, plan):
    key = load_key(paths.root, config.deid.key_scope)
    with PixelSpool(paths.images.parent, config.data.image_size) as spool:
        outcomes = decode_items([item.file for item in plan.todo], config.data.image_size, key, 1,
                                limits_of(config.data), spool=spool)
        return finish_ingest(paths, config, plan, outcomes)


def test_a_film_away_while_it_was_decoded_is_ingested_once_it_is_back(tmp_path):
    """Moved away after the plan hashed it (a sync job, a PACS export being rewritten), it is quarantined as
    missing; back unchanged, the next ingest must take it, not keep a remembered `missing_file` or call the outputs
    unchanged."""
    source = tmp_path / "data" / "raw" / "demo"
    write_demo_data(source, n=20, seed=4, size=64)
    paths, config = _project(tmp_path)
    film = sorted(p for p in source.rglob("*.png") if not p.name.startswith("broken"))[0]
    away = tmp_path / "away.png"
    shutil.move(film, away)
    ingest_stage(paths, config)  # without it: the cache holds films now, so the next plan hashes new files first
    shutil.move(away, film)
    plan = plan_ingest(paths, config)
    assert [item.file for item in plan.todo] == [film]
    shutil.move(film, away)
    assert _decode_and_finish(paths, config, plan).quarantine_reasons.get("missing_file") == 1
    shutil.move(away, film)

    back = ingest_stage(paths, config)

    assert back.n_decoded == 1 and "missing_file" not in back.quarantine_reasons
    kept = _outputs(paths)
    shutil.rmtree(paths.decode_cache)
    ingest_stage(paths, config)
    assert _outputs(paths) == kept  # as a cold ingest of the files as they are


def test_a_film_rewritten_after_the_plan_hashed_it_leaves_no_pixels_under_its_old_content(tmp_path):
    """A film and its byte copy share one content key, so only one of them is decoded; rewritten between the plan
    and its decode, its new pixels must not be cached under the old content's key, which the copy is served from."""
    source = tmp_path / "data" / "raw" / "demo"
    write_demo_data(source, n=20, seed=6, size=64)
    paths, _ = _project(tmp_path)
    config = load_config(paths.root / "params.yaml", ["data.dedupe=report"])  # every row kept: each film's own pixels
    ingest_stage(paths, config)  # the cache holds films: the next plan hashes new files first
    films = sorted(p for p in source.rglob("*.png") if not p.name.startswith("broken"))
    for name in ("Z0001_1.png", "Z0002_1.png"):  # two patients of their own, with the same new bytes
        (films[0].parent / name).write_bytes(films[0].read_bytes() + b"new bytes, the same pixels")
    plan = plan_ingest(paths, config)
    assert len(plan.todo) == 1  # byte copies: one decoded, the other served from the cache by the same key
    plan.todo[0].file.write_bytes(films[-1].read_bytes())  # after the plan hashed it, before it is decoded

    _decode_and_finish(paths, config, plan)

    kept = _outputs(paths)
    shutil.rmtree(paths.decode_cache)
    ingest_stage(paths, config)
    assert _outputs(paths) == kept  # as a cold ingest of the files as they are: the copy kept its own pixels


def test_what_a_writer_killed_halfway_left_in_the_decode_cache_is_deleted_at_the_next_ingest(tmp_path):
    """A shard written by a process killed before it wrote the index, and a temporary file, hold films' pixels
    that nothing reads and `cxr forget` would never find: the next ingest deletes them, and serves the rest."""
    write_demo_data(tmp_path / "data" / "raw" / "demo", n=20, seed=7, size=64)
    paths, config = _project(tmp_path)
    ingest_stage(paths, config)
    folder = _cache_index(paths).parent
    shard = next(folder.glob("shard-*.npy"))
    left = [folder / "shard-0123456789abcdef.npy", folder / f".shard-writing.tmp{os.getpid() + 1}.npy",
            folder / f".index.parquet.tmp{os.getpid() + 1}.parquet"]
    for path in left:
        shutil.copy2(shard, path)
    kept = _outputs(paths)
    (tmp_path / "data" / "raw" / "demo" / "normal" / "Z0009_1.png").write_bytes(b"not a film")  # so ingest runs again

    again = ingest_stage(paths, config)

    assert not [path for path in left if path.exists()]
    assert again.n_decoded == 1 and shard.exists()  # the new file only: the others served from the cache
    assert _outputs(paths)[:2] == kept[:2]  # the same manifest and films (one more quarantine row)
