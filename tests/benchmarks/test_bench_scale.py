"""Data at any scale (issue 40): the data stages' peak memory and time on the Kaggle layout at 1x, 10x and 100x.

Run: pytest -m benchmark -s tests/benchmarks/test_bench_scale.py            (1x and 10x)
     DIGITS_BENCH_TIMES=1,10,100 pytest -m benchmark -s tests/benchmarks/test_bench_scale.py   (adds 100x: ~8 GB)

Data: ../shared/data/scale/make_big.py writes train.csv at N x 42,000 rows (copy k of each row is the original
shifted by a seeded 0-2 pixels: distinct rows, correct labels); test.csv is Kaggle's own 28,000 rows. Written once
under $DIGITS_BENCH_DIR (default: pytest's temp folder) and kept there for the next run.
Each stage runs as its own `digits` command (`digits ingest --source kaggle --data DIR`, then `digits validate
--run ID`, ...) in a fresh process on one run folder; its peak RSS is the process tree's (psutil every 50 ms) and
its time the command's wall time (Python start-up and imports included, ~2-5 s).
Targets: each streaming stage's peak RSS <= 2 GB at 100x, and its time at 100x <= 12x its time at 10x.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import zipfile
from datetime import datetime
from pathlib import Path

import psutil
import pytest

import datagen

pytestmark = pytest.mark.benchmark
DIGITS = str(Path(sys.executable).with_name("digits"))
TIMES = tuple(int(t) for t in os.environ.get("DIGITS_BENCH_TIMES", "1,10").split(","))
STREAMING = ("ingest",)  # the stages whose memory must not grow with the data (the others are measured, not held)
STAGES = ("ingest", "validate", "convert")
LIMIT_MB = 2048


def _data(times: int, root: Path) -> Path:
    """The Kaggle layout at `times` x 42,000 train rows (made once, kept under root)."""
    out = root / f"kaggle-x{times}"
    if (out / "train.csv").is_file() and (out / "test.csv").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    make_big = datagen.shared_data("scale", "make_big.py")
    subprocess.run([sys.executable, str(make_big), str(out), "--times", str(times)], check=True, capture_output=True)
    with zipfile.ZipFile(datagen.shared_data("kaggle", "digit-recognizer.zip")) as archive, \
            archive.open("test.csv") as src, (out / "test.csv").open("wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 22)
    return out


def measured(command: list[str], env: dict[str, str], cwd: Path | None = None, samples: list | None = None) -> dict:
    """Run command; its wall seconds and the peak RSS (MB) of its process tree, sampled every 50 ms. samples, when
    given, receives (unix time, {process: RSS MB}, PSS MB of the tree) every second and at each new peak: a sum of
    RSS counts the pages processes share (TensorFlow's libraries, mapped by each process that imports it) once per
    process; PSS (proportional set size) splits each shared page among its sharers."""
    proc = subprocess.Popen(command, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak, done = 0, threading.Event()

    def sample() -> None:
        nonlocal peak
        root = psutil.Process(proc.pid)
        kept = 0.0
        while not done.is_set():
            try:
                tree = [root, *root.children(recursive=True)]
                sizes = {f"{p.pid} {' '.join(p.cmdline()[1:4])[:60]}": p.memory_info().rss for p in tree if p.is_running()}
                total = sum(sizes.values())
                if samples is not None and (total > peak or time.time() - kept >= 1):
                    pss = sum(p.memory_full_info().pss for p in tree if p.is_running())
                    samples.append((time.time(), {k: round(v / 2**20) for k, v in sizes.items()}, round(pss / 2**20)))
                    kept = time.time()
                peak = max(peak, total)
            except psutil.Error:
                pass
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    start = time.perf_counter()
    sampler.start()
    out, err = proc.communicate()
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    assert proc.returncode == 0, err[-3000:]
    return {"seconds": round(seconds, 1), "peak_rss_mb": round(peak / 2**20), "stdout": out}


@pytest.fixture(scope="module")
def bench_root(tmp_path_factory) -> Path:
    given = os.environ.get("DIGITS_BENCH_DIR")
    return Path(given) if given else tmp_path_factory.mktemp("scale")


def test_data_stages_at_scale(bench_root, tmp_path):
    results = {}
    for times in TIMES:
        data = _data(times, bench_root)
        size_gb = sum(p.stat().st_size for p in data.iterdir()) / 1e9
        home = tmp_path / f"home-x{times}"
        env = {**os.environ, "DIGITS_HOME": str(home), "TF_CPP_MIN_LOG_LEVEL": "2"}
        row = {"csv_gb": round(size_gb, 2)}
        ingested = measured([DIGITS, "ingest", "--source", "kaggle", "--data", str(data)], env)
        run_id = re.search(r"^run (\S+)", ingested["stdout"], re.M).group(1)
        row["ingest"] = {k: v for k, v in ingested.items() if k != "stdout"}
        for stage in STAGES[1:]:
            row[stage] = {k: v for k, v in measured([DIGITS, stage, "--run", run_id], env).items() if k != "stdout"}
        record = json.loads(next((home / "runs").glob(f"{run_id}/run.json")).read_text())
        row["rows"] = record["stages"]["ingest"]["outputs"]["counts"]
        results[times] = row
        print(f"\nx{times}: {json.dumps(row)}", flush=True)
        shutil.rmtree(home)  # its Parquet and TFRecords: gigabytes at 100x
    print(f"\nscale: {json.dumps(results)}")
    for stage in STREAMING:
        if 100 in results:
            assert results[100][stage]["peak_rss_mb"] <= LIMIT_MB, (stage, results[100][stage])
            assert results[100][stage]["seconds"] <= 12 * results[10][stage]["seconds"], (stage, results)


@pytest.mark.skipif(not os.environ.get("DIGITS_BENCH_BASELINE"), reason="DIGITS_BENCH_BASELINE names no checkout")
def test_ingest_beside_a_baseline_checkout(bench_root, tmp_path):
    """`digits ingest` of the 10x data from this checkout and from another (DIGITS_BENCH_BASELINE=PATH: e.g.
    `git worktree add /tmp/old 1b824f4`), one after the other in this script: time and peak RSS of each."""
    data = _data(10, bench_root)
    trees = {"baseline": os.environ["DIGITS_BENCH_BASELINE"], "this": str(Path(__file__).resolve().parents[2])}
    results = {}
    for name, tree in trees.items():
        env = {**os.environ, "PYTHONPATH": tree, "DIGITS_HOME": str(tmp_path / name)}
        code = f"import sys; sys.argv = ['digits', 'ingest', '--source', 'kaggle', '--data', {str(data)!r}]; " \
               "from flows.cli import main; main()"
        found = subprocess.run([sys.executable, "-c", "import flows; print(flows.__file__)"], env=env, cwd=tmp_path,
                               capture_output=True, text=True, check=True).stdout.strip()
        assert found.startswith(tree), (tree, found)  # the checkout's own code, not the installed one
        results[name] = {k: v for k, v in measured([sys.executable, "-c", code], env, cwd=tmp_path).items()
                         if k != "stdout"}
    print(f"\ningest at 10x: {json.dumps(results)}")


def test_a_bad_line_near_the_end_of_a_large_csv_is_one_line_and_leaves_nothing(bench_root, tmp_path):
    """The 10x train.csv (~0.8 GB) with one field of its last-but-two line made a letter: `digits ingest` stops
    with that line and column, exit 2, no traceback, and no Parquet anywhere under the home."""
    data = _data(10, bench_root)
    bad = tmp_path / "bad"
    bad.mkdir()
    shutil.copy(data / "test.csv", bad / "test.csv")
    with (data / "train.csv").open("rb") as src, (bad / "train.csv").open("wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 22)
    with (bad / "train.csv").open("rb+") as fh:
        fh.seek(-20_000, os.SEEK_END)
        tail = fh.read()
        starts = [i + 1 for i, byte in enumerate(tail) if byte == 0x0A][:-1]  # whole lines inside the tail
        at = starts[-3]  # the start of the last-but-two line
        fh.seek(-20_000 + at, os.SEEK_END)
        fh.write(b"x")  # its label field: "7,0,..." -> "x,0,..."
    with (bad / "train.csv").open("rb") as fh:
        total = sum(block.count(b"\n") for block in iter(lambda: fh.read(1 << 22), b""))
    expected_line = total - 2  # a newline ends every line: the last-but-two line's number
    home = tmp_path / "home"
    started = time.perf_counter()
    done = subprocess.run([DIGITS, "ingest", "--source", "kaggle", "--data", str(bad)], capture_output=True, text=True,
                          env={**os.environ, "DIGITS_HOME": str(home)})
    seconds = time.perf_counter() - started
    print(f"\nbad line {expected_line:,} of {(bad / 'train.csv').stat().st_size / 1e9:.2f} GB: {seconds:.1f} s: "
          f"{done.stderr.strip()}")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert f"line {expected_line}, column 1" in line and "expected a number, got 'x'" in line, line
    assert not list(home.rglob("*.parquet")) and not list(home.rglob(".ingest.*"))


FOLDER_ROWS = int(os.environ.get("DIGITS_BENCH_FOLDER_ROWS", "200000"))


def test_a_folder_of_200k_pngs_through_train_folder(bench_root, tmp_path):
    """A PNG tree of FOLDER_ROWS images (make_big.py --style folder: train/<label>/<n>.png) through `digits run
    train-folder` (fine-tuning the MNIST champion, one epoch), its peak RSS the process tree's: within 2 GB.
    The MNIST champion comes first from `digits run train-mnist` on the shared idx files (one epoch) in the same
    home. The folder is written once under $DIGITS_BENCH_DIR."""
    data = bench_root / f"folder-{FOLDER_ROWS}"
    if not (data / "train").is_dir():
        made = data.with_name(data.name + ".partial")
        shutil.rmtree(made, ignore_errors=True)
        subprocess.run([sys.executable, str(datagen.shared_data("scale", "make_big.py")), str(made), "--rows",
                        str(FOLDER_ROWS), "--style", "folder"], check=True, capture_output=True)
        made.rename(data)
    env = {**os.environ, "DIGITS_HOME": str(tmp_path / "home"), "TF_CPP_MIN_LOG_LEVEL": "2"}
    mnist = measured([DIGITS, "run", "train-mnist", "--data", str(datagen.shared_data("mnist")),
                      "--set", "train.epochs=1"], env)
    samples: list = []
    folder = measured([DIGITS, "run", "train-folder", "--data", str(data), "--set", "train.epochs=1"], env, samples=samples)
    record = json.loads(next((tmp_path / "home" / "runs").glob("*train-folder*/run.json")).read_text())
    seconds = {name: round(stage["seconds"], 1) for name, stage in record["stages"].items() if stage.get("seconds")}
    peaks = {}  # each stage's peak: the process tree's total, and each process's share at that moment
    for name, stage in record["stages"].items():
        start = datetime.fromisoformat(stage["started_at"]).timestamp()
        end = datetime.fromisoformat(stage["finished_at"]).timestamp() if stage.get("finished_at") else time.time()
        during = [(sum(sizes.values()), sizes, pss) for at, sizes, pss in samples if start <= at <= end]
        if during:
            total, sizes, _ = max(during, key=lambda s: s[0])
            peaks[name] = {"total_mb": total, "processes": sizes, "pss_mb": max(s[2] for s in during)}
    summary = {"images": FOLDER_ROWS, "counts": record["stages"]["convert"]["outputs"]["counts"],
               "train_folder": {k: v for k, v in folder.items() if k != "stdout"}, "stage_seconds": seconds,
               "stage_peaks": peaks, "peak_pss_mb": max((s[2] for s in samples), default=None),
               "val_accuracy": record["stages"]["evaluate"]["outputs"].get("val_accuracy"),
               "train_mnist_s": mnist["seconds"]}
    print(f"\nfolder at scale: {json.dumps(summary)}")
    assert record["status"] == "completed" and folder["peak_rss_mb"] <= LIMIT_MB, summary
