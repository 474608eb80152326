"""Serving speed: the champion answered over HTTP by MLflow's own server (`mlflow models serve`, POST /invocations)
and by `digits app` (POST /api/predict), against `digits predict` and the in-process scoring function, in the
same script on the same model.

Run: pytest -m benchmark -s tests/benchmarks/test_bench_serving.py
Goals (issue 38, a 2-core CPU): one image p50 <= 20 ms; >= 2,000 images/s in batches of 256. Batches go as JSON
(what most clients send) and in a binary format each server takes: Parquet for MLflow's server, NumPy bytes
(application/x-npy) for the app's endpoint.
The default model (digits-net) is trained one epoch on 2,000 Kaggle-layout digits (its weights do not change the
cost of a prediction; its architecture does) and registered by the real stages.
"""

from __future__ import annotations

import io
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
    import numpy as np
    import pandas as pd

    parquet = io.BytesIO()
    pd.DataFrame(rows.astype(np.float32), columns=[str(i) for i in range(784)]).to_parquet(parquet)
    npy = io.BytesIO()
    np.save(npy, pixels)  # uint8 [256, 28, 28]
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
            "batch": _summary(_timed(lambda: _post(invocations, batch), BATCHES), BATCH),
            "batch, Parquet": _summary(_timed(lambda: _post(invocations, parquet.getvalue(),
                                                            "application/vnd.apache.parquet"), BATCHES), BATCH)}
        api = f"http://127.0.0.1:{app_port}/api/predict"
        app_one = json.dumps({"images": pixels[:1].tolist()}).encode()
        app_batch = json.dumps({"images": pixels.tolist()}).encode()
        results["digits app (POST /api/predict, JSON)"] = {
            "one": _summary(_timed(lambda: _post(api, app_one), ONE)),
            "batch": _summary(_timed(lambda: _post(api, app_batch), BATCHES), BATCH),
            "batch, NumPy": _summary(_timed(lambda: _post(api, npy.getvalue(), "application/x-npy"), BATCHES), BATCH)}
        results["digits app (POST /api/predict, a PNG)"] = {
            "one": _summary(_timed(lambda: _post(api, png.read_bytes(), "image/png"), ONE))}
        expected = scoring(pixels).argmax(axis=1).tolist()
        for body, content_type in ((batch, "application/json"), (parquet.getvalue(), "application/vnd.apache.parquet")):
            assert [p["digit"] for p in _post(invocations, body, content_type)["predictions"]] == expected
        for body, content_type in ((app_batch, "application/json"), (npy.getvalue(), "application/x-npy")):
            assert [p["digit"] for p in _post(api, body, content_type)["predictions"]] == expected
    finally:
        for proc in servers:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
    print("\nserving: " + json.dumps(results, indent=1))
    mlflow_served = results["mlflow models serve (POST /invocations)"]
    app = results["digits app (POST /api/predict, JSON)"]
    assert mlflow_served["one"]["p50_ms"] <= 20 and app["one"]["p50_ms"] <= 20
    assert app["batch, NumPy"]["images_per_s"] >= 2000
    # JSON batches are reported, not asserted: parsing 200,000 numbers as text costs about what the model does
