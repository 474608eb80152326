"""Serving speed: the champion answered over HTTP by MLflow's own server (`mlflow models serve`, POST /invocations)
and by `digits app` (POST /api/predict), against `digits predict` and the in-process scoring function, in the
same script on the same model.

Run: pytest -m benchmark -s tests/benchmarks/test_bench_serving.py
Goals (issue 38, a 2-core CPU): one image p50 <= 20 ms (asserted); >= 2,000 images/s in batches of 256 (reported:
not met through JSON, see docs/benchmarks.md).
The default model (digits-net) is trained one epoch on 2,000 Kaggle-layout digits (its weights do not change the
cost of a prediction; its architecture does) and registered by the real stages.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

import datagen
from flows.local_api import free_port
from runs import make, validated_kaggle_run

pytestmark = pytest.mark.benchmark
NAME = "digits-kaggle"
ONE, BATCH, BATCHES = 300, 256, 30


def _post(url: str, body: bytes, content_type: str = "application/json") -> dict:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": content_type}, method="POST")
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


def _timed(call, n: int) -> list[float]:
    call()  # warm: the first call traces the model
    call()
    seconds = []
    for _ in range(n):
        start = time.perf_counter()
        call()
        seconds.append(time.perf_counter() - start)
    return seconds


def _summary(seconds: list[float], images: int = 1) -> dict:
    ordered = sorted(seconds)
    return {"p50_ms": round(1000 * statistics.median(ordered), 2),
            "p99_ms": round(1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], 2),
            "images_per_s": round(images / statistics.median(ordered))}


def _start(command: list[str], env: dict, url: str, log: Path) -> subprocess.Popen:
    proc = subprocess.Popen(command, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 180
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return proc
        except OSError:
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.5)


def test_serving_latency_and_throughput(tmp_path):
    from components.evaluate import load_predict
    from components.tracking import tracking_uri
    from flows import stages

    data = tmp_path / "kaggle"
    datagen.write_kaggle(data, n_train=2000, n_test=20)
    home = tmp_path / "home"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DIGITS_HOME", str(home))
        folder, config = validated_kaggle_run(data, "evaluate.threshold=0", "train.epochs=1")  # speed, not accuracy
        for artifact in ("converted", "model", "evaluation", "registration"):
            made = make(folder, config, artifact)
        assert made.promoted
        model_file = stages.registry().download(stages.registry().champion(NAME), tmp_path / "dl")
    env = {**os.environ, "DIGITS_HOME": str(home), "MLFLOW_TRACKING_URI": tracking_uri(home),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}  # MLflow runs `uvicorn`
    labels, pixels = datagen.digits(BATCH, seed=3)
    png = tmp_path / "one.png"
    Image.fromarray(255 - pixels[0]).save(png)
    rows = pixels.reshape(len(pixels), 784)  # the signature's rows of 784 pixels, as integers 0..255
    one = json.dumps({"inputs": rows[:1].tolist()}).encode()
    batch = json.dumps({"inputs": rows.tolist()}).encode()
    results = {}

    scoring = load_predict(model_file)  # the function `digits predict` scores with, in this process
    results["in-process scoring (digits predict's function)"] = {
        "one": _summary(_timed(lambda: scoring(pixels[:1]), ONE)),
        "batch": _summary(_timed(lambda: scoring(pixels), BATCHES), BATCH)}
    cli = _timed(lambda: subprocess.run([sys.executable.replace("python", "digits"), "predict",
                                         f"models:/{NAME}@champion", str(png)], env=env, check=True,
                                        capture_output=True), 3)
    results["digits predict (a process per call)"] = {"one": _summary(cli)}

    mlflow_port, app_port = free_port(), free_port()
    servers = [_start([sys.executable.replace("python", "mlflow"), "models", "serve", "-m", f"models:/{NAME}@champion",
                       "--env-manager", "local", "-h", "127.0.0.1", "-p", str(mlflow_port)], env,
                      f"http://127.0.0.1:{mlflow_port}/ping", tmp_path / "mlflow.log")]
    servers.append(_start([sys.executable.replace("python", "digits"), "app", "--model", NAME, "--port", str(app_port)],
                          env, f"http://127.0.0.1:{app_port}/api/model", tmp_path / "app.log"))
    try:
        invocations = f"http://127.0.0.1:{mlflow_port}/invocations"
        results["mlflow models serve (POST /invocations)"] = {
            "one": _summary(_timed(lambda: _post(invocations, one), ONE)),
            "batch": _summary(_timed(lambda: _post(invocations, batch), BATCHES), BATCH)}
        api = f"http://127.0.0.1:{app_port}/api/predict"
        app_one = json.dumps({"images": pixels[:1].tolist()}).encode()
        app_batch = json.dumps({"images": pixels.tolist()}).encode()
        results["digits app (POST /api/predict, JSON)"] = {
            "one": _summary(_timed(lambda: _post(api, app_one), ONE)),
            "batch": _summary(_timed(lambda: _post(api, app_batch), BATCHES), BATCH)}
        results["digits app (POST /api/predict, a PNG)"] = {
            "one": _summary(_timed(lambda: _post(api, png.read_bytes(), "image/png"), ONE))}
        served = _post(invocations, batch)["predictions"]
        assert [p["digit"] for p in served] == scoring(pixels).argmax(axis=1).tolist()
    finally:
        for proc in servers:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
    print("\nserving: " + json.dumps(results, indent=1))
    mlflow_served = results["mlflow models serve (POST /invocations)"]
    assert mlflow_served["one"]["p50_ms"] <= 20  # batches: MLflow parses JSON tensors slowly (docs/benchmarks.md)
    app = results["digits app (POST /api/predict, JSON)"]
    assert app["one"]["p50_ms"] <= 20
    # batches of 256 (goal >= 2,000 images/s) are reported, not asserted: on 2 cores the model alone scores
    # ~3,000 images/s, and JSON parsing takes the rest (docs/benchmarks.md, Serving)
