"""The champion, served: every registered version is an MLflow Model that MLflow's own tools load and serve
(`mlflow.pyfunc.load_model`, `mlflow models serve`), what decided its promotion is in its MLflow run, old versions
migrate in place, and `digits app` answers a drawing or a dropped file from whatever version the alias names.

One trained and registered model (a small Kaggle-layout run) is shared by the module's tests.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import datagen
from flows.local_api import free_port
from runs import make, validated_kaggle_run

NAME = "digits-kaggle"
CHAMPION_URI = f"models:/{NAME}@champion"
MLFLOW = str(Path(sys.executable).with_name("mlflow"))
DIGITS = str(Path(sys.executable).with_name("digits"))
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A digits home with digits-kaggle version 1 (champion) trained and registered by the real stages, and 100
    digit PNGs it never saw."""
    root = tmp_path_factory.mktemp("served")
    data = root / "kaggle"
    datagen.write_kaggle(data, n_train=1000, n_test=20)
    images = root / "images"
    images.mkdir()
    labels, pixels = datagen.digits(100, seed=7)
    for i, image in enumerate(pixels):
        Image.fromarray(255 - image).save(images / f"{i:03d}-{labels[i]}.png")  # dark ink on paper, as people write
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DIGITS_HOME", str(root / "home"))
        folder, config = validated_kaggle_run(data, "evaluate.threshold=0.2", "train.model=baseline",
                                              "train.epochs=3", "train.augment=false")
        for artifact in ("converted", "model", "evaluation", "registration"):
            made = make(folder, config, artifact)
        assert made.version == "1" and made.promoted, made.reason
        yield {"home": root / "home", "images": images, "labels": labels, "run": folder, "root": root}


@pytest.fixture
def in_home(served, home, monkeypatch):
    """The served home as DIGITS_HOME (after the `home` fixture, which the `cli` fixture sets up, has set its own)."""
    monkeypatch.setenv("DIGITS_HOME", str(served["home"]))
    return served


def _env(served) -> dict[str, str]:
    from components.tracking import tracking_uri

    return {**os.environ, "DIGITS_HOME": str(served["home"]), "MLFLOW_TRACKING_URI": tracking_uri(served["home"]),
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}  # MLflow runs `uvicorn`


def _digits_predict(served) -> dict[str, int]:
    """What `digits predict` says of each image (its own process, as a user runs it)."""
    done = subprocess.run([DIGITS, "predict", CHAMPION_URI, str(served["images"])], env=_env(served),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    rows = [line.split("\t") for line in done.stdout.strip().splitlines()[1:]]  # piped: a header, then TSV
    return {Path(row[0]).name: int(row[1]) for row in rows}


def _prepared(served) -> tuple[list[str], np.ndarray]:
    from components import predict as predict_component

    files, batch, failures = predict_component.prepare_files(predict_component.image_files([served["images"]]))
    assert not failures
    return [f.name for f in files], batch.reshape(len(batch), 784).astype(np.float32)  # rows, as the signature says


def test_a_registered_version_is_an_mlflow_model_with_what_decided_its_promotion(in_home, monkeypatch):
    import mlflow
    from mlflow.tracking import MlflowClient

    from components.tracking import tracking_uri

    uri = tracking_uri(in_home["home"])
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # not mlflow.set_tracking_uri: it sets the variable for good
    client = MlflowClient(uri)
    version = client.get_model_version_by_alias(NAME, "champion")
    local = Path(mlflow.artifacts.download_artifacts(f"{version.source}", dst_path=str(in_home["root"] / "dl")))
    mlmodel = (local / "MLmodel").read_text()
    assert "loader_module: components.registry.mlflow_model" in mlmodel and "keras_version" in mlmodel
    assert "pickle" not in mlmodel and "cloudpickle" not in mlmodel and not list(local.glob("*.pkl"))
    info = mlflow.models.get_model_info(CHAMPION_URI)
    assert info.signature.inputs.to_dict() == [{"type": "tensor", "tensor-spec": {"dtype": "float32",
                                                                                  "shape": (-1, 784)}}]
    assert [c["name"] for c in info.signature.outputs.to_dict()] == ["digit", "confidence", "abstained",
                                                                      "probabilities"]
    assert info.metadata["digits"]["model_sha256"] == version.tags["digits.model_sha256"]
    example = json.loads((local / "input_example.json").read_text())
    assert np.asarray(example).shape == (1, 784)

    # what decided the promotion: in the version's description and its MLflow run
    assert version.description.startswith("champion: ")
    run = client.get_run(version.run_id)
    assert run.data.metrics["eval_val_accuracy"] == pytest.approx(float(version.tags["digits.val_accuracy"]), abs=1e-6)
    assert {"eval_ece", "eval_class_0_recall", "eval_gate_passed"} <= set(run.data.metrics)
    logged = {a.path for folder in ("evaluation", "validation", "model_card")
              for a in client.list_artifacts(version.run_id, folder)}
    assert {"evaluation/metrics.json", "evaluation/report.html", "validation/report.html",
            "model_card/model_card.html"} <= logged

    # loaded by MLflow's own pyfunc: the same digits as `digits predict` on 100 images it never saw
    model = mlflow.pyfunc.load_model(CHAMPION_URI)
    names, batch = _prepared(in_home)
    answers = model.predict(batch)
    expected = _digits_predict(in_home)
    assert dict(zip(names, answers["digit"].tolist())) == expected
    right = np.mean([int(name.split("-")[1].split(".")[0]) == digit for name, digit in expected.items()])
    assert right > 0.5  # a real model, not a constant
    abstaining = model.predict(batch[:5], params={"min_confidence": 1.0})
    assert abstaining["abstained"].all() and np.allclose([sum(p) for p in abstaining["probabilities"]], 1, atol=1e-4)


def test_a_tampered_model_file_is_refused_by_the_mlflow_loader(in_home, tmp_path, monkeypatch):
    import mlflow

    from components.tracking import tracking_uri

    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri(in_home["home"]))
    local = Path(mlflow.artifacts.download_artifacts(CHAMPION_URI, dst_path=str(tmp_path)))
    with open(local / "model.keras", "ab") as f:
        f.write(b"\0")
    with pytest.raises(Exception, match="sha256 differs"):
        mlflow.pyfunc.load_model(str(local))


def _post(url: str, body: bytes, content_type: str = "application/json", timeout: float = 60) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": content_type}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def _wait_until_up(url: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            assert proc.poll() is None, f"the server ended: {proc.stderr.read() if proc.stderr else ''}"
            assert time.monotonic() < deadline, f"{url} did not answer in {timeout:.0f} s"
            time.sleep(0.5)


def _stop(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_mlflow_models_serve_answers_like_digits_predict_and_refuses_bad_input(served, tmp_path):
    port = free_port()
    log = open(tmp_path / "serve.log", "w+")
    proc = subprocess.Popen([MLFLOW, "models", "serve", "-m", CHAMPION_URI, "--env-manager", "local",
                             "-h", "127.0.0.1", "-p", str(port)], env=_env(served), stdout=log, stderr=log,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_until_up(f"{url}/ping", proc)
        names, batch = _prepared(served)
        status, answer = _post(f"{url}/invocations", json.dumps({"inputs": batch.tolist()}).encode())
        assert status == 200, answer
        served_digits = {name: row["digit"] for name, row in zip(names, answer["predictions"])}
        assert served_digits == _digits_predict(served)
        assert set(answer["predictions"][0]) == {"digit", "confidence", "abstained", "probabilities"}
        import io

        import pandas as pd

        parquet = io.BytesIO()  # the binary format MLflow's server takes: a batch's fast way (docs/serving.md)
        pd.DataFrame(batch.astype(np.float32), columns=[str(i) for i in range(784)]).to_parquet(parquet)
        status, answer = _post(f"{url}/invocations", parquet.getvalue(), "application/vnd.apache.parquet")
        assert status == 200 and [row["digit"] for row in answer["predictions"]] == [served_digits[n] for n in names]

        one = batch[:1]
        bad = {"not JSON": b"{images: [",
               "27 rows": json.dumps({"inputs": one[:, :27 * 28].tolist()}).encode(),
               "3 channels": json.dumps({"inputs": np.repeat(one, 3, axis=1).tolist()}).encode(),
               "out of range": json.dumps({"inputs": (one * 2 + 1).tolist()}).encode(),
               "NaN": json.dumps({"inputs": np.where(one > 0, np.nan, one).tolist()}).encode(),
               "empty batch": json.dumps({"inputs": np.zeros((0, 784)).tolist()}).encode(),
               "10,000 images": json.dumps({"inputs": np.zeros((10_000, 784), np.uint8).tolist()}).encode()}
        said = {}
        for what, body in bad.items():
            status, answer = _post(f"{url}/invocations", body)
            assert status == 400, (what, status, str(answer)[:300])
            said[what] = answer.get("message", "")
        # digits' own checks: one line each; MLflow's schema check (shape, an empty list) says its own message
        assert "expected 0..255" in said["out of range"] and "NaN" in said["NaN"] and "at most 4096" in said["10,000 images"]
        assert said["27 rows"].endswith("does not match expected shape (-1, 784).")
        assert "schema" in said["empty batch"] or "no images" in said["empty batch"]
        for what in ("out of range", "NaN", "10,000 images"):  # MLflow's server puts the data before the error
            assert said[what].splitlines()[-1].startswith("Error: digits: "), (what, said[what][-300:])
        status, answer = _post(f"{url}/invocations", json.dumps({"inputs": one.tolist()}).encode())
        assert status == 200 and proc.poll() is None  # still up after all of it
    finally:
        _stop(proc)


def test_a_version_registered_before_mlflow_models_is_migrated_in_place(in_home, cli, tmp_path, monkeypatch):
    import mlflow
    from mlflow.tracking import MlflowClient

    from components.registry import MODEL_FILE, MODEL_SHA256
    from components.tracking import tracking_uri
    from schemas.artifacts import sha256_file

    uri = tracking_uri(in_home["home"])
    client = MlflowClient(uri)
    model_file = in_home["run"].stage_dir("train") / "model.keras"
    experiment = client.create_experiment("old-registrations", artifact_location=(tmp_path / "old").as_uri())
    run_id = client.create_run(experiment).info.run_id
    client.log_artifact(run_id, str(model_file), artifact_path="model")  # as digits registered before
    client.create_registered_model("digits-old")
    tags = {MODEL_FILE: "model.keras", MODEL_SHA256: sha256_file(model_file), "digits.run_id": "an-old-run"}
    old = client.create_model_version("digits-old", source=f"{client.get_run(run_id).info.artifact_uri}/model",
                                      run_id=run_id, tags=tags)
    client.set_registered_model_alias("digits-old", "champion", old.version)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # not mlflow.set_tracking_uri: it sets the variable for good
    with pytest.raises(Exception):
        mlflow.pyfunc.load_model("models:/digits-old@champion")

    result = cli("registry", "migrate", "digits-old")
    assert result.code == 0, result.err
    assert "version 1: now an MLflow model" in result.out
    again = client.get_model_version_by_alias("digits-old", "champion")
    assert again.version == old.version and {k: again.tags[k] for k in tags} == tags
    names, batch = _prepared(in_home)
    assert mlflow.pyfunc.load_model("models:/digits-old@champion").predict(batch)["digit"].tolist() == \
        mlflow.pyfunc.load_model(CHAMPION_URI).predict(batch)["digit"].tolist()
    assert "already an MLflow model" in cli("registry", "migrate", "digits-old").out
    result = cli("registry", "migrate", "no-such-model")
    assert result.code == 2 and "no registered model 'no-such-model'" in result.err


# --- digits app ------------------------------------------------------------------------------------------------

def test_the_app_answers_files_and_arrays_follows_the_alias_and_refuses_bad_input(in_home, cli):
    from fastapi.testclient import TestClient

    from components import app as app_component
    from components.registry import mlflow_model
    from flows import stages

    follower = app_component.Follower(stages.registry, NAME, "champion")
    client = TestClient(app_component.build(follower, min_confidence=0.5))
    page = client.get("/").text
    assert "<canvas" in page and "http" not in page.replace("http-equiv", "")  # no CDN: nothing fetched from outside
    assert client.get("/api/model").json()["version"] == "1"
    assert client.get("/model-card").text.count("Model details")

    names, batch = _prepared(in_home)
    expected = _digits_predict(in_home)
    for name in names[:5]:
        answer = client.post("/api/predict", content=(in_home["images"] / name).read_bytes(),
                             headers={"Content-Type": "image/png"}).json()
        assert answer["predictions"][0]["digit"] == expected[name] and answer["model"]["version"] == "1"
        assert np.asarray(answer["prepared"]).shape == (28, 28)
    arrays = client.post("/api/predict", json={"images": batch.reshape(-1, 28, 28).tolist()}).json()
    assert [p["digit"] for p in arrays["predictions"]] == [expected[n] for n in names]
    for array in (batch.reshape(-1, 28, 28).astype(np.uint8), batch.reshape(-1, 784)):  # NumPy bytes: a batch's fast way
        answer = client.post("/api/predict", content=_npy(array), headers={"Content-Type": "application/x-npy"}).json()
        assert [p["digit"] for p in answer["predictions"]] == [expected[n] for n in names]

    bomb = in_home["root"] / "bomb.png"
    Image.new("L", (12_000, 12_000), 255).save(bomb)
    bad = {"not JSON": ("{images", "application/json"),
           "27 rows": (json.dumps({"images": batch[:1].reshape(1, 28, 28)[:, :27].tolist()}), "application/json"),
           "3 channels": (json.dumps({"images": np.repeat(batch[:1].reshape(1, 28, 28, 1), 3, axis=3).tolist()}),
                          "application/json"),
           "out of range": (json.dumps({"images": (batch[:1] - 300).tolist()}), "application/json"),
           "NaN": (json.dumps({"images": np.full((1, 28, 28), np.nan).tolist()}), "application/json"),
           "empty batch": (json.dumps({"images": []}), "application/json"),
           "10,000 images": (json.dumps({"images": np.zeros((10_000, 28, 28), np.uint8).tolist()}), "application/json"),
           "not NumPy": (b"%PDF-1.4 not an array", "application/x-npy"),
           "NumPy of objects": (_npy(np.array([{"pixels": 1}], dtype=object)), "application/x-npy"),
           "NumPy cut short": (_npy(batch[:2])[:-100], "application/x-npy"),
           "NumPy of 3 channels": (_npy(np.zeros((1, 28, 28, 3), np.uint8)), "application/x-npy"),
           "NumPy out of range": (_npy(np.full((1, 784), -1.0)), "application/x-npy"),
           "NumPy, 10,000 images": (_npy(np.zeros((10_000, 28, 28), np.uint8)), "application/x-npy"),
           "not an image": (b"%PDF-1.4 not a picture", "image/png"),
           "bomb": (bomb.read_bytes(), "image/png"),
           "blank": (_png(np.full((40, 40), 255, np.uint8)), "image/png")}
    for what, (body, kind) in bad.items():
        response = client.post("/api/predict", content=body, headers={"Content-Type": kind})
        assert response.status_code == 400, (what, response.text[:300])
        message = response.json()["error"]
        assert message and "\n" not in message and "Traceback" not in message, (what, message)
    huge = client.post("/api/predict", content=b"\0" * (50 * 1024 * 1024), headers={"Content-Type": "image/png"})
    assert huge.status_code == 413 and "at most" in huge.json()["error"]
    assert mlflow_model.MAX_IMAGES < 10_000

    # the alias moves: the next answer comes from the new champion, without a restart
    reg = stages.registry()
    current = reg.champion(NAME)
    second, promoted = reg.register(NAME, in_home["run"].stage_dir("train") / "model.keras",
                                    {"digits.run_id": "another"}, lambda champion: False)
    assert not promoted
    assert cli("registry", "promote", NAME, second.version).code == 0
    answer = client.post("/api/predict", content=(in_home["images"] / names[0]).read_bytes(),
                         headers={"Content-Type": "image/png"}).json()
    assert answer["model"]["version"] == second.version
    assert cli("registry", "rollback", NAME).code == 0
    assert client.get("/api/model").json()["version"] == current.version


def _npy(array: np.ndarray) -> bytes:
    import io

    out = io.BytesIO()
    np.save(out, array, allow_pickle=True)  # an object array too: what a hostile client could send
    return out.getvalue()


def _png(pixels: np.ndarray) -> bytes:
    import io

    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def test_digits_app_refuses_what_it_cannot_serve_in_one_line(in_home, cli, tmp_path, monkeypatch):
    result = cli("app", "--model", "digits-mnist")
    assert result.code == 2
    (line,) = result.err.strip().splitlines()
    assert "nothing to serve" in line and "digits run train-mnist" in line
    result = cli("app", "--model", NAME, "--alias", "nobody")
    assert result.code == 2 and "no alias 'nobody'" in result.err and len(result.err.strip().splitlines()) == 1
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        result = cli("app", "--model", NAME, "--port", str(taken.getsockname()[1]))
    assert result.code == 2 and "--port" in result.err and len(result.err.strip().splitlines()) == 1


STROKES = {"1": [[(140, 40), (140, 240)]],
           "7": [[(70, 50), (215, 50), (120, 245)]]}


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (Debian package: chromium)")
def test_a_person_draws_digits_and_drops_a_file_on_the_page(served, tmp_path):
    from playwright.sync_api import sync_playwright

    from components import predict as predict_component
    from components.registry import mlflow_model
    from flows import stages

    port = free_port()
    log = open(tmp_path / "app.log", "w+")
    proc = subprocess.Popen([DIGITS, "app", "--model", NAME, "--port", str(port)], env=_env(served), stdout=log,
                            stderr=log, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_until_up(f"{url}/api/model", proc)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True,
                                                 args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_page(viewport={"width": 1100, "height": 800})
            page.route("**/*", lambda route: route.continue_() if route.request.url.startswith(url) else route.abort())
            page.goto(url)
            page.get_by_text(f"{NAME} version 1").wait_for(timeout=30_000)
            box = page.locator("#pad").bounding_box()
            model = mlflow_model.from_file(stages.registry().download(stages.registry().resolve(CHAMPION_URI),
                                                                      tmp_path / "model"))
            for digit, strokes in STROKES.items():
                page.click("#clear")
                with page.expect_request("**/api/predict") as sent:
                    for stroke in strokes:
                        page.mouse.move(box["x"] + stroke[0][0], box["y"] + stroke[0][1])
                        page.mouse.down()
                        for x, y in stroke[1:]:
                            page.mouse.move(box["x"] + x, box["y"] + y, steps=15)
                        page.mouse.up()
                page.wait_for_function("document.getElementById('verdict').textContent.includes('your drawing')")
                drawing = tmp_path / f"drawn-{digit}.png"
                drawing.write_bytes(sent.value.post_data_buffer)  # the drawing the page sent, as a PNG file
                files, canonical, failures = predict_component.prepare_files([drawing])  # as `digits predict` does
                assert files and not failures, failures
                said = int(model.predict(canonical[..., None].astype(np.float32))["digit"][0])
                assert page.locator("#digit").get_attribute("data-digit") == str(said), digit
                column_ink = canonical[0].astype(float).sum(axis=0)
                if digit == "1":  # a vertical stroke, prepared into a narrow column of ink in the middle
                    assert column_ink[:10].sum() + column_ink[18:].sum() < 0.05 * column_ink.sum()
            sample = sorted(served["images"].iterdir())[0]
            page.set_input_files("#pick", str(sample))
            page.wait_for_function(f"document.getElementById('verdict').textContent.includes('{sample.name}')")
            expected = _digits_predict(served)[sample.name]
            assert page.locator("#digit").get_attribute("data-digit") == str(expected)
            page.screenshot(path=str(tmp_path / "app.png"), full_page=True)
            browser.close()
    finally:
        _stop(proc)
