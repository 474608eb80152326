"""Prediction on a person's own images: `digits predict MODEL_URI IMAGE...`.

An image of any size becomes a canonical digit the way MNIST's were made (LeCun et al.): grayscale;
light ink on a dark background (inverted when the background is light); cropped to the ink's
bounding box; scaled, keeping its aspect ratio with anti-aliasing, to fit a 20x20 box; placed in a
28x28 field so that its centre of mass sits at the centre.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from components.files import check_regular_file
from schemas.dataset import IMAGE_SIDE
from schemas.errors import DigitsInputError

Model = Callable[[np.ndarray], np.ndarray]  # canonical uint8 [N, 28, 28] -> probabilities [N, 10]
BOX = 20  # MNIST's digits fit a 20x20 box inside the 28x28 field
INK = 0.25  # share of the darkest-to-lightest range above which a pixel counts as ink, for cropping
MAX_PIXELS = 40_000_000  # larger images are refused before they are decoded (a 12-megapixel photo is fine)


Judge = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]  # canonical images -> (is a digit, OOD score)


def load(uri: str, registry: Callable[[], object], *, reject_ood: bool = False) -> tuple[Model, Judge | None]:
    """(scoring function, out-of-distribution judge or None) for a model URI (see load_model). reject_ood: also
    the detector the evaluate stage fitted for that very model (components.ood), from the registry version or,
    for a .keras file, beside it or in its run's evaluate/ folder; DigitsInputError when there is none."""
    import tempfile

    from components import ood
    from components.registry import MODEL_SHA256

    if not reject_ood:
        return load_model(uri, registry), None
    if uri.startswith("models:/"):
        reg = registry()
        version = reg.resolve(uri)
        with tempfile.TemporaryDirectory(prefix="digits-predict-") as scratch:
            model_file = reg.download(version, Path(scratch))
            fetched = reg.fetch(version, ood.FILE, Path(scratch))
            candidates = [fetched] if fetched is not None else []
            return _with_judge(model_file, version.tags.get(MODEL_SHA256), candidates, uri)
    path = Path(uri).expanduser()
    if path.suffix != ".keras" or not path.is_file():
        raise DigitsInputError(f"{uri}: --reject-ood needs a models:/ URI or a run's .keras model (the out-of-"
                               "distribution detector is fitted for a Keras model by the evaluate stage)")
    return _with_judge(path, None, [path.parent / ood.FILE, path.parent.parent / "evaluate" / ood.FILE], uri)


def _with_judge(model_file: Path, sha256: str | None, candidates: list[Path], uri: str) -> tuple[Model, Judge]:
    from components import ood
    from components.evaluate import load_predict
    from components.keras_layers import load_keras_model
    from schemas.artifacts import sha256_file

    scoring = load_predict(model_file, sha256)  # checks the file (its sha256, that it is a digit classifier)
    detector = ood.for_model(Path(uri), sha256 or sha256_file(model_file), candidates)
    model = load_keras_model(model_file, compile=False)
    return scoring, lambda images: detector.is_digit(model, images)


def load_model(uri: str, registry: Callable[[], object]) -> Model:
    """A scoring function for a registry URI (models:/NAME@ALIAS or models:/NAME/VERSION), a .keras file, or
    an exported SavedModel folder.

    Nothing in a model file runs as code: Keras models load in safe mode; a registry version loads
    only the file it recorded, with the sha256 it recorded (a pca-svm .joblib, a pickle, loads only
    that way); a SavedModel — a TensorFlow program, whose functions could read or write files — loads
    only from a run's `export/saved_model` whose files match what that run's export stage recorded.
    Raises DigitsInputError (one line) for anything else."""
    import tempfile

    from components.evaluate import load_predict
    from components.registry import MODEL_SHA256

    if uri.startswith("models:/"):
        reg = registry()
        version = reg.resolve(uri)
        with tempfile.TemporaryDirectory(prefix="digits-predict-") as scratch:  # in memory once loaded
            return load_predict(reg.download(version, Path(scratch)), version.tags.get(MODEL_SHA256))
    path = Path(uri).expanduser()
    if path.is_dir() and (path / "saved_model.pb").is_file():
        _verify_export(path)
        return _saved_model(path)
    if path.is_file():
        return load_predict(path)
    raise DigitsInputError(f"{uri}: not a model (expected models:/NAME@ALIAS, models:/NAME/VERSION, a .keras "
                           "file or a run's export/saved_model folder)")


def _verify_export(saved_model: Path) -> None:
    """A SavedModel folder is loaded only as the export stage of a digits run wrote it."""
    from schemas.artifacts import Exported
    from schemas.errors import DamagedArtifact
    from schemas.runs import RunFolder

    export_dir = saved_model.resolve().parent
    run = RunFolder(export_dir.parent)
    refusal = (f"{saved_model}: a SavedModel is a TensorFlow program (its functions can read and write files), so "
               "digits predict loads one only from a run's export/saved_model that matches what the run recorded; "
               "use a .keras file or a models:/ URI")
    if saved_model.name != "saved_model" or export_dir.name != "export" or not run.path.is_file():
        raise DigitsInputError(refusal)
    try:
        record = run.load().stages.get("export")
    except Exception:
        raise DigitsInputError(refusal) from None
    if record is None or record.status != "completed" or not any(f.startswith("saved_model/") for f in record.hashes):
        raise DigitsInputError(refusal)
    try:
        Exported.load(export_dir, {}, record.hashes).verify()
    except DamagedArtifact as exc:
        raise DigitsInputError(f"{exc}; refusing to load {saved_model}") from None


def _saved_model(path: Path) -> Model:
    from components.tensorflow_runtime import import_tensorflow

    tf = import_tensorflow()
    try:
        serving = tf.saved_model.load(str(path)).signatures["serving_default"]
    except Exception as exc:  # TensorFlow raises many types for a bad SavedModel
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise DigitsInputError(f"{path}: not a loadable SavedModel ({first})") from None
    return lambda images: serving(images=tf.constant(images, dtype=tf.uint8))["probabilities"].numpy()


SUFFIXES = (".png", ".jpg", ".jpeg")  # what a folder given to predict (or the folder source) is read for


def image_files(paths: Sequence[Path]) -> list[Path]:
    """The images to predict: a file as given; a folder's PNG/JPEG files by name (hidden ones and other
    files left out, not its sub-folders)."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found += sorted(p for p in path.iterdir() if p.suffix.lower() in SUFFIXES and not p.name.startswith("."))
        else:
            found.append(path)
    return found


def prepare_files(images: Sequence[Path], max_pixels: int = MAX_PIXELS) -> tuple[list[Path], np.ndarray, list[str]]:
    """(the files that could be prepared, their canonical digits [N, 28, 28] uint8, one line per file that could
    not): one bad file does not stop the others."""
    good, prepared, failures = [], [], []
    for path in images:
        try:
            prepared.append(prepare(read(path, max_pixels), str(path)))
            good.append(path)
        except DigitsInputError as exc:
            failures.append(str(exc))
    batch = np.stack(prepared) if prepared else np.zeros((0, IMAGE_SIDE, IMAGE_SIDE), np.uint8)
    return good, batch, failures


def classify(model: Model, batch: np.ndarray) -> list[list[tuple[int, float]]]:
    """Per canonical image, every class with its probability, the most probable first."""
    probabilities = model(batch)
    return [[(int(c), float(p[c])) for c in np.argsort(-p, kind="stable")] for p in probabilities]


def read(path: Path, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """The image as grayscale float in [0, 1], upright; transparent areas count as white paper.

    Upright: a photo's EXIF Orientation tag (how phones store a picture taken sideways) is applied, as an
    image viewer shows it. A 16-bit or floating-point grayscale image is scaled by its own darkest and lightest
    values (its format's range would clip it, or leave it near black). Raises DigitsInputError naming the file
    when it is missing, not a regular file (a FIFO or device would block the read), not a readable PNG/JPEG,
    truncated, or larger than max_pixels (checked from its header, before any pixel is decoded)."""
    check_regular_file(path)
    try:
        return _decode(path, str(path), max_pixels)
    except FileNotFoundError:
        raise DigitsInputError(f"{path}: no such file") from None


def file_bytes(path: Path) -> bytes:
    """A file's bytes, read once (the folder source hashes and decodes the same bytes), or DigitsInputError naming
    it when it is missing, not a regular file (a FIFO or device would block the read) or cannot be read."""
    check_regular_file(path)
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise DigitsInputError(f"{path}: no such file") from None
    except OSError as exc:
        raise DigitsInputError(f"{path}: cannot be read ({exc.strerror})") from None


def decode(data: bytes, name: str = "upload", max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """read() of an image's bytes (an upload): the same checks, named `name` in the one-line errors."""
    import io

    return _decode(io.BytesIO(data), name, max_pixels)


def _decode(source, name: str, max_pixels: int) -> np.ndarray:
    import warnings

    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the size is checked below instead
            with Image.open(source) as image:
                width, height = image.size
                if width * height > max_pixels:
                    raise DigitsInputError(f"{name}: image too large ({width} x {height} pixels; at most "
                                           f"{max_pixels:,} pixels are read)")
                image.load()
                image = ImageOps.exif_transpose(image)
                if image.mode in WIDE_GRAY:
                    return _own_range(np.asarray(image, dtype=np.float64))
                if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
                    paper = Image.new("RGBA", image.size, (255, 255, 255, 255))
                    image = Image.alpha_composite(paper, image.convert("RGBA"))
                gray = image.convert("L")
    except FileNotFoundError:
        raise
    except Image.DecompressionBombError as exc:
        raise DigitsInputError(f"{name}: image too large ({exc})") from None
    except UnidentifiedImageError:  # PIL's own message names its stream object (an upload's: an address)
        raise DigitsInputError(f"{name}: not a readable image (PNG or JPEG expected): no image format recognised "
                               "in its first bytes") from None
    except (OSError, SyntaxError, ValueError) as exc:  # PIL's errors for a broken file
        raise DigitsInputError(f"{name}: not a readable image (PNG or JPEG expected): {exc}") from None
    return np.asarray(gray, dtype=np.float32) / 255.0


WIDE_GRAY = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")  # PIL's modes of 16-bit, 32-bit and float grayscale


def _own_range(values: np.ndarray) -> np.ndarray:
    """Grayscale of any range as float32 in [0, 1], by its own darkest and lightest values (a flat image: 0)."""
    low, high = float(np.nanmin(values)), float(np.nanmax(values))
    if not np.isfinite(low) or not np.isfinite(high) or high <= low:
        return np.zeros(values.shape, np.float32)
    return ((np.nan_to_num(values, nan=low) - low) / (high - low)).astype(np.float32)


def prepare(gray: np.ndarray, name: str = "image") -> np.ndarray:
    """A canonical 28x28 uint8 digit (0 background, 255 ink) from a grayscale [0, 1] image of any size."""
    from PIL import Image

    border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    ink = 1.0 - gray if np.median(border) > 0.5 else gray.copy()  # MNIST: light ink on dark
    ink -= np.median(np.concatenate([ink[0], ink[-1], ink[:, 0], ink[:, -1]]))  # background to 0
    ink = np.clip(ink, 0, None)
    peak = float(ink.max())
    if peak < 0.1:
        raise DigitsInputError(f"{name}: no digit found (the image is blank or has no contrast)")
    ink /= peak
    rows, cols = np.nonzero(ink > INK)
    crop = ink[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    height, width = crop.shape
    scale = BOX / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    boxed = np.asarray(Image.fromarray((crop * 255).astype(np.uint8)).resize(size, Image.Resampling.LANCZOS),
                       dtype=np.float32)
    field = np.zeros((IMAGE_SIDE, IMAGE_SIDE), np.float32)
    top, left = _centre_of_mass_offset(boxed)
    field[top:top + boxed.shape[0], left:left + boxed.shape[1]] = boxed
    return np.clip(field, 0, 255).round().astype(np.uint8)


def _centre_of_mass_offset(boxed: np.ndarray) -> tuple[int, int]:
    """Top-left corner that puts the box's centre of mass at the field's centre, kept inside the field."""
    mass = boxed.sum()
    ys, xs = np.indices(boxed.shape)
    cy, cx = (ys * boxed).sum() / mass, (xs * boxed).sum() / mass
    top = int(round(IMAGE_SIDE / 2 - 0.5 - cy))
    left = int(round(IMAGE_SIDE / 2 - 0.5 - cx))
    return (min(max(top, 0), IMAGE_SIDE - boxed.shape[0]), min(max(left, 0), IMAGE_SIDE - boxed.shape[1]))
