"""`digits app`: a local page to try a registered model — draw a digit or drop PNG/JPEG files, and see the digit,
its ten probabilities, whether the model abstains, and which model answered (name, version, alias, model card).

A FastAPI app served by uvicorn (both installed with MLflow); the page is one HTML file with its script and style
inline, so it works offline. Routes:

    GET  /                 the page
    GET  /api/model        the model that answers now: name, version, alias, model card, min_confidence
    POST /api/predict      an image's bytes (image/png, image/jpeg; prepared as `digits predict` prepares a file:
                           crop, centre by mass, resize, polarity), or canonical images (0 background, 255 ink) as
                           JSON {"images": [N x 28 x 28 (x 1)]} or as one NumPy array (application/x-npy: the bytes
                           of numpy.save, uint8 or float, [N, 28, 28], [N, 28, 28, 1] or [N, 784]; no pickles) ->
                           {"model": ..., "predictions": [...]}
    GET  /model-card       the version's model card (kept with it in the registry, checked against its sha256)

It follows the alias: before each answer it looks the alias up again — skipped while a local registry's database file
is unchanged (for at most RECHECK seconds) — and a version that changed (a promotion, a rollback) is loaded before it
answers; no restart. Bad input is one line in {"error": ...} with HTTP 400 (413
for a body over MAX_IMAGE_BODY or MAX_ARRAY_BODY bytes); the server stays up. A batch is fastest as NumPy bytes:
parsing JSON numbers costs more than the model (docs/benchmarks.md, Serving).
"""

from __future__ import annotations

import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from fastapi import Request  # at module level: FastAPI reads the route's annotations from this module's names

from components.registration import tag
from components.registry import Registry, Version
from components.registry import mlflow_model
from schemas.errors import DigitsInputError

MAX_IMAGE_BODY = 10 * 1024 * 1024  # bytes of one uploaded picture: a phone photo fits; a 50 MB upload is refused
MAX_ARRAY_BODY = 32 * 1024 * 1024  # bytes of JSON or NumPy images: MAX_IMAGES images as text, or as float64, fit
NPY = "application/x-npy"
ARRAYS = ("application/json", NPY)  # content types of canonical images (anything else is an uploaded picture)
RECHECK = 1.0  # seconds: the alias is looked up at least this often even when the registry's file state is unchanged
PAGE = Path(__file__).with_name("app.html")


@dataclass
class Loaded:
    version: Version
    model: mlflow_model.DigitsModel
    card: bytes | None  # the model card's HTML, when the version has one


class Follower:
    """The model `models:/NAME@ALIAS` names now, loaded again when the alias moves."""

    def __init__(self, registry: Callable[[], Registry], name: str, alias: str) -> None:
        self.registry, self.uri = registry, f"models:/{name}@{alias}"
        self.name, self.alias = name, alias
        self._loaded: Loaded | None = None
        self._registry: Registry | None = None
        self._token: object | None = None  # the registry's change token when the alias was last looked up
        self._looked = 0.0  # when (time.monotonic) the alias was last looked up
        self._lock = threading.Lock()

    def current(self) -> Loaded:
        """The version the alias names now (DigitsInputError when it names none): the alias looked up again unless
        the registry's change token is unchanged (for at most RECHECK seconds); the version is downloaded and
        loaded only when it changed."""
        if self._registry is None:
            self._registry = self.registry()
        loaded, token, now = self._loaded, self._registry.change_token(), time.monotonic()
        if loaded is not None and token is not None and token == self._token and now - self._looked < RECHECK:
            return loaded  # nothing in the registry changed since the last look (a local store's file state)
        if loaded is not None and self._registry.alias_version(self.name, self.alias) == loaded.version.version:
            self._token, self._looked = token, now
            return loaded
        with self._lock:
            version = self._registry.resolve(self.uri)
            if self._loaded is None or self._loaded.version.version != version.version:
                self._loaded = _load(self._registry, version)
            self._token, self._looked = token, now
            return self._loaded


def _load(reg: Registry, version: Version) -> Loaded:
    from components.model_card import HTML

    with tempfile.TemporaryDirectory(prefix="digits-app-") as scratch:
        model_file = reg.download(version, Path(scratch))  # checked against the sha256 it was registered with
        if model_file.suffix != ".keras":
            raise DigitsInputError(f"{version.uri} is a {model_file.suffix} model; the app serves Keras models")
        model = mlflow_model.from_file(model_file)
        card_file = reg.fetch(version, HTML, Path(scratch) / "card")
        return Loaded(version, model, card_file.read_bytes() if card_file else None)


def describe(loaded: Loaded, alias: str, min_confidence: float) -> dict:
    version = loaded.version
    return {"name": version.name, "version": version.version, "alias": alias, "aliases": version.aliases,
            "uri": f"models:/{version.name}/{version.version}", "model_card": "/model-card" if loaded.card else None,
            "val_accuracy": version.tags.get(tag("val_accuracy")), "min_confidence": min_confidence}


def predict_body(loaded: Loaded, body: bytes, content_type: str, min_confidence: float) -> dict:
    """The answer to a POST /api/predict body (DigitsInputError, one line, for anything it cannot take)."""
    import json

    from components import predict as predict_component

    prepared = None
    if content_type.startswith(ARRAYS):
        if content_type.startswith(NPY):
            images = _npy(body)
        else:
            try:
                payload = json.loads(body)
            except ValueError as exc:
                raise DigitsInputError(f"the body is not JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from None
            images = payload.get("images", payload.get("inputs")) if isinstance(payload, dict) else None
            if images is None:
                raise DigitsInputError('expected JSON {"images": [[28 rows of 28 values 0..255], ...]}')
        try:
            canonical = mlflow_model.checked_images(images)
        except Exception as exc:  # mlflow_model refuses with MlflowException; its message is the one line
            raise DigitsInputError(getattr(exc, "message", str(exc)).removeprefix("digits: ")) from None
    else:
        if not body:
            raise DigitsInputError("the body is empty: send an image (PNG or JPEG), JSON images or a NumPy array")
        gray = predict_component.decode(body, "the upload")
        prepared = predict_component.prepare(gray, "the upload")
        canonical = prepared[None, ..., None].astype(np.float32)
    probabilities = loaded.model.probabilities(canonical)
    digits, confidence = probabilities.argmax(axis=1).tolist(), probabilities.max(axis=1).tolist()
    rows = [{"digit": d, "confidence": c, "abstained": c < min_confidence, "probabilities": p}
            for d, c, p in zip(digits, confidence, probabilities.round(6).tolist())]
    answer = {"predictions": rows}
    if prepared is not None:
        answer["prepared"] = prepared.tolist()  # what the model saw: 28 x 28, 0..255
    return answer


def _npy(body: bytes) -> np.ndarray:
    """The array of an application/x-npy body (numpy.save's bytes): numbers only, never a pickled object; the header's
    shape and type must account for the body's bytes exactly (checked before anything is allocated)."""
    import io

    from numpy.lib import format as npy

    stream = io.BytesIO(body)
    try:
        version = npy.read_magic(stream)
        header = npy.read_array_header_1_0 if version == (1, 0) else npy.read_array_header_2_0
        shape, fortran, dtype = header(stream)
    except (ValueError, EOFError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DigitsInputError(f"the body is not a NumPy array (the bytes numpy.save writes): {reason}") from None
    if dtype.hasobject or dtype.kind not in "uif":
        raise DigitsInputError(f"the NumPy array holds {dtype}; expected numbers (uint8 or float)")
    data = memoryview(body)[stream.tell():]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        raise DigitsInputError(f"the NumPy array's header says {list(shape)} of {dtype} ({expected:,} bytes); the body "
                               f"holds {len(data):,} after it")
    return np.frombuffer(data, dtype=dtype).reshape(shape, order="F" if fortran else "C")


def build(follower: Follower, min_confidence: float = 0.0):
    """The FastAPI app."""
    from fastapi import FastAPI
    from fastapi.responses import HTMLResponse, JSONResponse, Response

    app = FastAPI(title="digits", docs_url=None, redoc_url=None, openapi_url=None)
    page = PAGE.read_text()

    def refused(message: str, status: int = 400) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    @app.get("/", response_class=HTMLResponse)
    def index() -> str:
        return page

    @app.get("/api/model")
    def model():
        try:
            return describe(follower.current(), follower.alias, min_confidence)
        except DigitsInputError as exc:
            return refused(str(exc), 503)

    @app.get("/model-card")
    def model_card():
        try:
            loaded = follower.current()
        except DigitsInputError as exc:
            return refused(str(exc), 503)
        if loaded.card is None:
            return refused(f"{loaded.version.uri} has no model card", 404)
        return Response(loaded.card, media_type="text/html")

    @app.post("/api/predict")
    async def predict(request: Request):
        content_type = request.headers.get("content-type", "application/octet-stream").lower()
        limit = MAX_ARRAY_BODY if content_type.startswith(ARRAYS) else MAX_IMAGE_BODY
        what = "JSON or NumPy images" if limit == MAX_ARRAY_BODY else "an uploaded image"
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            return refused(f"the body is {int(declared):,} bytes; at most {limit:,} are taken for {what}", 413)
        body = bytearray()
        async for chunk in request.stream():  # counted as it comes: a body that does not declare its length
            body += chunk
            if len(body) > limit:
                return refused(f"the body is over {limit:,} bytes; at most {limit:,} are taken for {what}", 413)
        return await _answer(bytes(body), content_type)

    async def _answer(body: bytes, content_type: str):
        from starlette.concurrency import run_in_threadpool

        def work():
            loaded = follower.current()
            return {"model": describe(loaded, follower.alias, min_confidence),
                    **predict_body(loaded, body, content_type, min_confidence)}
        try:
            return JSONResponse(await run_in_threadpool(work))  # plain JSON: FastAPI's encoder walks every number
        except DigitsInputError as exc:
            return refused(str(exc))

    return app
