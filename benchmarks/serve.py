"""Serving benchmark: does `mlflow models serve` hold load, and does it refuse bad requests and keep serving?

Why it exists: the registered model is what a hospital deploys (README "Serving"). A PACS router sends films one at
a time from several connections at once; the server must answer all of them, and a malformed body, a truncated
DICOM or a PNG whose header declares 50,000 x 50,000 px must get a 4xx with a reason, not a crash or a hang.
This benchmark starts `mlflow models serve` on a champion (a demo project it trains in a temporary folder, or
`--project`'s), sends `--concurrency` clients x (`--requests` / `--concurrency`) requests of real film bytes (base64
of ../shared/data/samples' chest films when present, else demo films; one film per request, as a router sends
them), and prints p50/p95/p99 latency, requests per second and errors (a non-200 answer, or a row with `error`).
The limit it compares with is the same model in this process: its raw forward rate (images already resized, batch
of one) and its answer rate for the same file bytes (decode + resize + forward). Then it sends each bad request,
checks it got a 4xx with a reason, and checks a good film is still answered after each.

Run it from the repository root, on an otherwise idle machine:

    .venv/bin/python benchmarks/serve.py                 # 1,000 requests at concurrency 8 (about 3-5 minutes on 2 cores)
    .venv/bin/python benchmarks/serve.py --help

Its last lines are `errors=<n>` (target 0), `bad_requests_refused=<k>/3` and `serve_vs_in_process=<x.xx>` (requests
per second through HTTP over the in-process answer rate for the same films). It exits 1 when there were errors or a
bad request was not refused with a 4xx, or the server stopped answering.
"""

from __future__ import annotations

import os

os.environ.setdefault("CXR_DEID_KEY", "benchmark-key-0123456789abcdef0123456789")  # before pipeline imports: no key file is written

import argparse
import base64
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.machine import BUSY_WARNING, cpu_snapshot, others_cpu_s  # noqa: E402

SAMPLES = REPO.parent / "shared" / "data" / "samples"
SAMPLE_DICOMS = ("1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm", "CR-MONO1-10-chest.dcm", "RG1_J2KI.dcm")
BIN = Path(sys.executable).parent


@dataclass(frozen=True)
class Answer:
    status: int
    seconds: float
    body: str


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(
            "Start `mlflow models serve` on a champion and send concurrent requests of real film bytes (one film, "
            "base64, per request); print latency percentiles, requests per second and errors, against the model's "
            "in-process forward and answer rates; then check that a malformed body, a truncated DICOM and a PNG "
            "declaring 50,000 x 50,000 px each get a 4xx with a reason while a good film is still answered."
        ),
        epilog="Run on an otherwise idle machine; the defaults take about 3-5 minutes on 2 cores (training the demo model included).",
    )
    parser.add_argument("--requests", type=int, default=1000, help="requests in all (default 1000)")
    parser.add_argument("--concurrency", type=int, default=8, help="clients sending at once (default 8)")
    parser.add_argument("--workers", type=int, default=1, help="server worker processes, `mlflow models serve --workers` (default 1)")
    parser.add_argument("--project", type=Path, default=None,
                        help="a project folder whose registry has a champion (default: train a demo one in a temporary folder)")
    parser.add_argument("--films", choices=("samples", "demo"), default="samples" if SAMPLES.is_dir() else "demo",
                        help=f"real films from {SAMPLES} (default when present) or the demo project's own films")
    args = parser.parse_args()
    if args.requests < 1 or args.concurrency < 1 or args.workers < 1:
        parser.error("--requests, --concurrency and --workers must be at least 1")
    return args


# --- the model and the films ----------------------------------------------------------------------------------


def demo_project(folder: Path):  # -> pipeline.paths.ProjectPaths
    """A small demo project run through every stage (64 px films, 32 px model, one epoch): a champion to serve."""
    import yaml

    from pipeline.config import load_config
    from pipeline.demo_data import write_demo_data
    from pipeline.paths import ProjectPaths
    from pipeline.stages import run_stages

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"]["image_size"], params["train"]["epochs"], params["train"]["batch_size"] = 32, 1, 16
    folder.mkdir(parents=True)
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    write_demo_data(folder / "data" / "raw" / "demo", n=80, seed=0, size=64)
    paths = ProjectPaths(folder)
    run_stages(paths, load_config(folder / "params.yaml"))
    return paths


def film_bytes(kind: str, project: Path) -> list[tuple[str, bytes]]:
    """(name, bytes) of the films the clients send: the samples' chest films (Kermany JPEGs, chest CR DICOMs), or
    the project's demo films."""
    if kind == "samples":
        files = sorted((SAMPLES / "kermany_fullres").rglob("*.jpeg")) + [SAMPLES / "dicom" / name for name in SAMPLE_DICOMS]
    else:
        films = sorted(p for p in (project / "data" / "raw" / "demo").rglob("*")
                       if p.suffix in (".dcm", ".png", ".jpg") and not p.name.startswith("broken"))  # the demo's broken files
        files = films[:: max(1, len(films) // 20)]  # about 20, from both labels
    return [(f.name, f.read_bytes()) for f in files if f.is_file()]


def bad_requests(pydicom_truncated: Path) -> dict[str, bytes]:
    """The three bad requests: a body that is not JSON, a truncated DICOM, a PNG whose header declares 50,000 x 50,000."""
    return {"malformed body": b'{"dataframe_split": {"columns": ["image"], "data": [[',
            "truncated DICOM": body([pydicom_truncated.read_bytes()]),
            "PNG declaring 50000x50000": body([huge_png_header(50_000, 50_000)])}


def huge_png_header(width: int, height: int) -> bytes:
    """A well-formed PNG whose IHDR declares width x height grey pixels, with one short IDAT: it costs about 60 bytes
    to send and, at 50,000 x 50,000, 2.5 GB to decode."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 0, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(bytes(width + 1))) + chunk(b"IEND", b"")


def body(contents: list[bytes]) -> bytes:
    rows = [[base64.b64encode(content).decode("ascii")] for content in contents]
    return json.dumps({"dataframe_split": {"columns": ["image"], "data": rows}}).encode()


def in_process_rates(project, films: list[tuple[str, bytes]], model_uri: str, seconds: float = 5.0) -> tuple[float, float]:
    """Films per second of the model in this process, one film at a time, on one torch thread: the raw forward on
    images already resized, and the whole answer (decode + resize + forward) for the same bytes the clients send.
    One thread, because back-to-back calls on torch's default threads spin against any other load on the machine
    (on a busy 2-core machine: 7 forwards/s on 2 threads, 80 on 1), which would make the limit meaningless."""
    import torch

    from pipeline.predict import load_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _rates(load_model(model_uri, project), films, seconds)
    finally:
        torch.set_num_threads(threads)


def _rates(model, films: list[tuple[str, bytes]], seconds: float) -> tuple[float, float]:
    import numpy as np

    served = model.unwrap_python_model()
    size = served.image_size
    image = np.full((1, size, size), 128, dtype=np.uint8)
    rows = [[base64.b64encode(content).decode("ascii")] for _, content in films]
    served.probabilities(image), served.answer_files(rows[0])  # warm up
    forward = _rate(lambda i: served.probabilities(image), 1, seconds)
    answer = _rate(lambda i: served.answer_files(rows[i % len(rows)]), len(rows), seconds)  # whole passes: the clients' mix
    return forward, answer


def _rate(call, unit: int, seconds: float) -> float:
    """Calls per second, over whole multiples of `unit` calls, for at least `seconds`."""
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or count % unit or count < 3:
        call(count)
        count += 1
    return count / (time.perf_counter() - start)


# --- the server and the clients ---------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(project: Path, model_uri: str, port: int, workers: int, log: Path, output: Path) -> subprocess.Popen:
    """`mlflow models serve` in the project folder, on 127.0.0.1; its answers logged to `log` (pipeline.monitoring),
    its own output to the file `output` (a pipe nobody reads fills with access-log lines and stalls the server)."""
    from pipeline.config import default_tracking_uri

    env = dict(os.environ, MLFLOW_TRACKING_URI=default_tracking_uri(project), CXR_MONITOR_LOG=str(log),
               PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    command = [str(BIN / "mlflow"), "models", "serve", "-m", model_uri, "--env-manager", "local", "-h", "127.0.0.1",
               "-p", str(port), "--workers", str(workers)]
    with output.open("w") as sink:
        return subprocess.Popen(command, cwd=project, env=env, stdout=sink, stderr=subprocess.STDOUT)


def wait_until_up(url: str, process: subprocess.Popen, output: Path, seconds: float = 180) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"serve: the server exited early:\n{output.read_text(errors='replace')[-3000:]}")
        try:
            with urllib.request.urlopen(url + "/ping", timeout=2):
                return
        except OSError:
            time.sleep(1)
    raise SystemExit(f"serve: {url} did not answer within {seconds:.0f} s")


def post(url: str, data: bytes, timeout: float = 120) -> Answer:
    request = urllib.request.Request(url + "/invocations", data=data, headers={"Content-Type": "application/json"})
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return Answer(response.status, time.perf_counter() - start, response.read().decode())
    except urllib.error.HTTPError as error:
        return Answer(error.code, time.perf_counter() - start, error.read().decode(errors="replace"))
    except OSError as error:  # refused, reset, timed out: the server did not answer
        return Answer(0, time.perf_counter() - start, f"{type(error).__name__}: {error}")


def answered(answer: Answer) -> bool:
    """A 200 whose rows hold no `error` (an out_of_scope row is an answer)."""
    if answer.status != 200:
        return False
    rows = json.loads(answer.body)["predictions"]
    return bool(rows) and all(not row.get("error") for row in rows)


def load(url: str, bodies: list[bytes], requests: int, concurrency: int) -> tuple[list[Answer], float]:
    """`concurrency` clients, each sending its share of `requests` one after another; the answers and wall time."""
    shares = [requests // concurrency + (1 if i < requests % concurrency else 0) for i in range(concurrency)]
    counter, lock = iter(range(requests)), threading.Lock()

    def client(share: int) -> list[Answer]:
        mine = []
        for _ in range(share):
            with lock:
                i = next(counter)
            mine.append(post(url, bodies[i % len(bodies)]))
        return mine

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        answers = [a for part in pool.map(client, shares) for a in part]
    return answers, time.perf_counter() - start


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def reason_of(answer: Answer) -> str:
    """The message a 4xx carries (MLflow's JSON `message`, first line, shortened)."""
    try:
        message = json.loads(answer.body).get("message", answer.body)
    except ValueError:
        message = answer.body
    message = message.split("Error: ", 1)[-1].strip().splitlines()[0] if message.strip() else ""
    return message[:160]


def main() -> int:
    args = parse_args()
    from pydicom.data import get_testdata_file

    with tempfile.TemporaryDirectory(prefix="cxr-serve-bench-") as scratch:
        scratch = Path(scratch)
        started = time.perf_counter()
        if args.project is None:
            print("training a demo champion in a temporary project ...", flush=True)
            project_root = demo_project(scratch / "project").root
        else:
            project_root = args.project.resolve()
        from pipeline.config import load_config
        from pipeline.paths import ProjectPaths

        project = ProjectPaths(project_root)
        model_uri = f"models:/{load_config(project_root / 'params.yaml').registry.model_name}@champion"
        films = film_bytes(args.films, project_root)
        if not films:
            raise SystemExit(f"serve: no films found for --films {args.films}")
        print(f"model {model_uri} ({time.perf_counter() - started:.0f} s to prepare); {len(films)} films ({args.films}), "
              f"{statistics.mean(len(c) for _, c in films) / 1e3:.0f} kB on average", flush=True)
        forward, in_process = in_process_rates(project, films, model_uri)
        bodies = [body([content]) for _, content in films]
        port, log = free_port(), scratch / "monitoring.jsonl"
        url = f"http://127.0.0.1:{port}"
        output = scratch / "server.log"
        server = start_server(project_root, model_uri, port, args.workers, log, output)
        try:
            wait_until_up(url, server, output)
            for data in bodies:  # warm up: every film once
                post(url, data)
            snapshot = cpu_snapshot()
            answers, wall = load(url, bodies, args.requests, args.concurrency)
            busy = others_cpu_s(snapshot) / (wall * (os.cpu_count() or 1))
            bad = bad_requests(Path(get_testdata_file("MR_truncated.dcm")))
            checks = []
            for name, data in bad.items():
                refused = post(url, data)
                after = post(url, bodies[0])
                checks.append((name, refused, answered(after)))
            alive = answered(post(url, bodies[-1]))
        finally:
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
        logged = sum(1 for _ in log.open()) if log.is_file() else 0

    latencies = [a.seconds * 1000 for a in answers]
    errors = [a for a in answers if not answered(a)]
    rate = len(answers) / wall
    print(f"\n{args.requests} requests (1 film each) from {args.concurrency} clients, {args.workers} server worker(s), "
          f"on {os.cpu_count()} CPUs")
    print(f"latency ms: p50 {percentile(latencies, 50):.1f}  p95 {percentile(latencies, 95):.1f}  p99 {percentile(latencies, 99):.1f}  "
          f"max {max(latencies):.1f}")
    print(f"throughput: {rate:.1f} requests/s over {wall:.1f} s")
    print(f"in-process limit (1 worker, 1 torch thread): forward {forward:.1f} films/s on resized images; answer {in_process:.1f} films/s "
          f"on the same bytes (decode + resize + forward)")
    if busy > BUSY_WARNING:
        print(f"warning: other processes took {busy:.0%} of the machine's CPU while the load ran; the figures are pessimistic")
    for error in errors[:5]:
        print(f"error: HTTP {error.status}: {error.body[:200]}")
    print(f"monitoring records written by the server: {logged}")
    refused = 0
    for name, answer, ok_after in checks:
        good = 400 <= answer.status < 500 and bool(reason_of(answer))
        refused += good and ok_after
        print(f"{name}: HTTP {answer.status} ({reason_of(answer)}); a good film afterwards: {'answered' if ok_after else 'NOT ANSWERED'}")
    print(f"errors={len(errors)}")
    print(f"bad_requests_refused={refused}/{len(checks)}")
    print(f"serve_vs_in_process={rate / in_process:.2f}")
    return 0 if not errors and refused == len(checks) and alive else 1


if __name__ == "__main__":
    sys.exit(main())
