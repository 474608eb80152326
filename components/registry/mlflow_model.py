"""A digits model as an MLflow Model: what every registered version holds, so that MLflow's own tools load and
serve it (`mlflow.pyfunc.load_model("models:/digits-mnist@champion")`, `mlflow models serve -m ...`).

The folder (`write`), logged as the artifacts `model/` of the version's MLflow run:

    MLmodel                   flavors, signature, input example, digits' metadata
    model.keras               the trained file, byte for byte (its sha256 is the version's digits.model_sha256)
    input_example.json        one canonical digit; serving_input_example.json: the same as a request body
    requirements.txt, python_env.yaml

Two flavors name the same file. `keras` (Keras 3, `data: model` -> model.keras) for people who load it with
Keras. `python_function` with `loader_module: components.registry.mlflow_model`: this module, installed with
digits — not code stored in the artifact, and never a pickle. It loads the .keras file in Keras' safe mode
with digits' own layers known by their registered names (components.keras_layers), checks the file against the
sha256 in MLmodel, and answers a batch of canonical images with the digit, its probability, whether the model
abstains (param `min_confidence`) and the ten probabilities.

Input (the signature): float32 [N, 784] — each row a 28x28 image, row by row, as Kaggle's CSVs hold them — 0 =
background, 255 = ink: light digits on a dark field, cropped, scaled into a 20x20 box and centred by mass as MNIST's
were (`digits predict` and `digits app` prepare any picture that way). At most MAX_IMAGES images a call; anything else is refused with one line
(MlflowException INVALID_PARAMETER_VALUE: HTTP 400 from `mlflow models serve`).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from schemas.dataset import IMAGE_SIDE, N_CLASSES

LOADER = "components.registry.mlflow_model"
MODEL = "model.keras"  # the keras flavor's `data: model` names <folder>/model.keras
MLMODEL = "MLmodel"
MAX_IMAGES = 4096  # per call: a request of more is refused, saying so
PIXELS = IMAGE_SIDE * IMAGE_SIDE
INPUT = (f"float32 [N, {PIXELS}]: each row one 28x28 image, row by row (Kaggle's pixel0..pixel783), 0..255: light ink "
         "(255) on a dark background (0), the digit cropped, scaled to fit 20x20 and centred by mass in the 28x28 "
         "field (MNIST's preparation)")
REQUIREMENTS = ("mlflow", "keras", "tensorflow-cpu", "tensorflow", "numpy", "pandas")


def signature():
    """What a digits model takes and gives, for MLmodel."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, PIXELS))]),  # rows, not [N, 28, 28, 1]: MLflow's
        # server parses a JSON tensor by deep-copying its nested lists, 10x slower for 28 x 28 x 1 than for rows
        outputs=Schema([ColSpec("long", "digit"), ColSpec("double", "confidence"), ColSpec("boolean", "abstained"),
                        ColSpec(Array("double"), "probabilities")]),
        params=ParamSchema([ParamSpec("min_confidence", "double", 0.0)]))


def write(model_file: Path, out_dir: Path, *, sha256: str, example: np.ndarray | None = None,
          facts: dict | None = None) -> Path:
    """The MLflow Model folder of a .keras file at out_dir (made; must not exist). example: canonical images
    (uint8 [N, 28, 28]) of which the first is the input example; facts: more of digits' metadata (name, run)."""
    import os
    from importlib.metadata import version

    from mlflow.models import Model
    from mlflow.pyfunc import add_to_model
    from mlflow.utils.environment import _PythonEnv

    out_dir.mkdir(parents=True)
    shutil.copyfile(model_file, out_dir / MODEL)
    model = Model()
    model.signature = signature()
    model.metadata = {"digits": {"input": INPUT, "classes": list(range(N_CLASSES)), "model_sha256": sha256,
                                 "max_images": MAX_IMAGES, **(facts or {})}}
    if example is not None and len(example):
        from mlflow.models.utils import _save_example

        _save_example(model, np.asarray(example[:1], np.float32).reshape(1, PIXELS), str(out_dir))
    model.add_flavor("keras", data="model", keras_version=version("keras"),  # read without importing TensorFlow
                     keras_backend=os.environ.get("KERAS_BACKEND", "tensorflow"), save_exported_model=False)
    add_to_model(model, loader_module=LOADER, data=MODEL, python_env="python_env.yaml")
    model.save(str(out_dir / MLMODEL))
    (out_dir / "requirements.txt").write_text("\n".join(_pins()) + "\n")
    _PythonEnv.current().to_yaml(str(out_dir / "python_env.yaml"))
    return out_dir


def log(client, run_id: str, model_file: Path, *, example: np.ndarray | None = None,
        facts: dict | None = None) -> None:
    """A model as the artifacts `model/` of its MLflow run (client: an MlflowClient): a Keras model as an MLflow
    Model (`write`), any other file (pca-svm's .joblib, a pickle: never made an MLflow Model) as it is."""
    import tempfile

    from schemas.artifacts import sha256_file

    if model_file.suffix != ".keras":
        client.log_artifact(run_id, str(model_file), artifact_path="model")
        return
    with tempfile.TemporaryDirectory(prefix="digits-mlflow-model-") as scratch:
        folder = write(model_file, Path(scratch) / "model", sha256=sha256_file(model_file), example=example,
                       facts=facts)
        client.log_artifacts(run_id, str(folder), artifact_path="model")


def _pins() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    pins = []
    for name in REQUIREMENTS:
        try:
            pins.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            pass
    return pins


# --- loading (MLflow calls _load_pyfunc) ------------------------------------------------------------------

class DigitsModel:
    """A digits model as MLflow's pyfunc sees it: predict(images, params) -> a DataFrame, a row an image."""

    def __init__(self, model, metadata: dict) -> None:
        import threading

        self.model, self.metadata = model, metadata
        self._lock = threading.Lock()  # one batch at a time through the model (a server's threads share it)

    def get_raw_model(self):
        return self.model

    def predict(self, data, params: dict | None = None):
        min_confidence = float((params or {}).get("min_confidence") or 0.0)
        if not 0.0 <= min_confidence <= 1.0:
            _refuse(f"min_confidence must be between 0 and 1, not {min_confidence:g}")
        return _frame(self.probabilities(checked_images(data)), min_confidence)

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """The ten probabilities of each of images (checked_images' output), float64 [N, 10]."""
        from components.keras_layers import predict

        dtype = np.dtype(str(self.model.inputs[0].dtype))
        images = (images if dtype.kind == "f" else np.rint(images)).astype(dtype)
        with self._lock:
            return np.asarray(predict(self.model, images), np.float64)


def _frame(probabilities: np.ndarray, min_confidence: float):
    """The rows a digits model answers: digit, confidence, abstained, probabilities."""
    import pandas as pd

    confidence = probabilities.max(axis=1)
    return pd.DataFrame({"digit": probabilities.argmax(axis=1).astype(np.int64), "confidence": confidence,
                         "abstained": confidence < min_confidence,
                         "probabilities": [row.round(6).tolist() for row in probabilities]})


def checked_images(data) -> np.ndarray:
    """Canonical images float32 [N, 28, 28, 1] from what a caller sent (rows of 784 pixels, [N, 28, 28] or
    [N, 28, 28, 1]), or one line saying what is wrong (_refuse)."""
    import pandas as pd

    if isinstance(data, dict) and len(data) == 1:
        data = next(iter(data.values()))
    if isinstance(data, pd.DataFrame):
        data = data.to_numpy()
    try:
        images = np.asarray(data, dtype=np.float64)
    except (TypeError, ValueError):
        _refuse(f"expected {INPUT}; got values that are not numbers")
    if images.ndim == 2 and images.shape[1] == IMAGE_SIDE * IMAGE_SIDE:  # rows of 784 pixels (Kaggle's CSV layout)
        images = images.reshape(len(images), IMAGE_SIDE, IMAGE_SIDE, 1)
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[1:] != (IMAGE_SIDE, IMAGE_SIDE, 1):
        _refuse(f"expected images of shape [N, {PIXELS}] (or [N, {IMAGE_SIDE}, {IMAGE_SIDE}]); got {list(images.shape)}")
    if not len(images):
        _refuse("no images: send at least one")
    if len(images) > MAX_IMAGES:
        _refuse(f"{len(images)} images in one call; at most {MAX_IMAGES} (send them in batches)")
    if not np.isfinite(images).all():
        _refuse("the images hold NaN or infinite values; expected 0..255")
    low, high = float(images.min()), float(images.max())
    if low < 0 or high > 255:
        _refuse(f"pixel values range {low:g}..{high:g}; expected 0..255 (0 = background, 255 = ink)")
    return images.astype(np.float32)


def _refuse(message: str):
    from mlflow.exceptions import INVALID_PARAMETER_VALUE, MlflowException

    raise MlflowException(f"digits: {message}", error_code=INVALID_PARAMETER_VALUE)


def load(folder: Path) -> DigitsModel:
    """The model of an MLflow Model folder written by `write`: its file checked against the recorded sha256,
    loaded in safe mode, checked to be a digit classifier."""
    from mlflow.models import Model

    from schemas.artifacts import sha256_file
    from schemas.errors import DigitsInputError

    metadata = (Model.load(str(folder / MLMODEL)).metadata or {}).get("digits", {})
    model_file = folder / MODEL
    expected = metadata.get("model_sha256")
    if not model_file.is_file():
        raise DigitsInputError(f"{folder}: holds no {MODEL}")
    if not expected or sha256_file(model_file) != expected:
        raise DigitsInputError(f"{model_file}: not the model that was registered (its sha256 differs from MLmodel's "
                               "digits.model_sha256); refusing to load it")
    return from_file(model_file, metadata)


def from_file(model_file: Path, metadata: dict | None = None) -> DigitsModel:
    """A .keras file (already checked by its caller) loaded in safe mode and checked to be a digit classifier."""
    from components.keras_layers import check_classifier, load_keras_model

    model = load_keras_model(model_file, compile=False)
    check_classifier(model, str(model_file))
    return DigitsModel(model, metadata or {})


def _load_pyfunc(data_path: str) -> DigitsModel:
    """MLflow's entry point (MLmodel's python_function loader_module): data_path is <folder>/model.keras."""
    return load(Path(data_path).parent)
