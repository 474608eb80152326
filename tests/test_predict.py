"""`digits predict`: a person's own images, prepared the way MNIST's digits were, then classified."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from components.predict import prepare, read
from flows import stages
from runs import make
from schemas.config import apply_overrides, default_config
from schemas.errors import DigitsInputError
from strokes import draw_digit

# where each digit's 60x80 box starts in its 100x100 image: none of them centred
OFFSETS = [(8, 6), (30, 14), (4, 18), (36, 4), (20, 10), (2, 2), (34, 16), (12, 20), (26, 8), (6, 12)]


def _centre_of_mass(image: np.ndarray) -> tuple[float, float]:
    ys, xs = np.indices(image.shape)
    return float((ys * image).sum() / image.sum()), float((xs * image).sum() / image.sum())


def test_an_image_is_prepared_as_mnist_was(tmp_path):
    """Light paper inverted, cropped to the ink, fitted in 20x20, centre of mass at the centre."""
    path = draw_digit(7, tmp_path / "seven.png", size=300, offset=(200, 10), width=9)
    canonical = prepare(read(path))
    assert canonical.shape == (28, 28) and canonical.dtype == np.uint8
    assert canonical[0].max() == 0 and canonical[:, 0].max() == 0 and canonical.max() == 255  # ink light, paper 0
    rows, cols = np.nonzero(canonical > 0)
    assert max(np.ptp(rows), np.ptp(cols)) + 1 <= 21  # the 20x20 box (plus anti-aliasing's fringe)
    assert np.allclose(_centre_of_mass(canonical), (13.5, 13.5), atol=0.75)
    # the same digit drawn light-on-dark comes out the same
    inverted = tmp_path / "inverted.png"
    Image.fromarray(255 - np.asarray(Image.open(path).convert("L"))).save(inverted)
    assert np.abs(prepare(read(inverted)).astype(int) - canonical).max() <= 1


def test_bad_images_are_one_line_errors(cli, tmp_path):
    blank = tmp_path / "blank.png"
    Image.new("L", (50, 50), 255).save(blank)
    with pytest.raises(DigitsInputError, match="no digit found"):
        prepare(read(blank), str(blank))
    (tmp_path / "notes.png").write_text("not an image")
    model = tmp_path / "model.keras"
    model.write_bytes(b"")
    result = cli("predict", str(model), str(tmp_path / "notes.png"))
    assert result.code == 2 and "notes.png: not a readable image" in result.err
    assert len(result.err.strip().splitlines()) == 1
    digit = draw_digit(3, tmp_path / "three.png")
    result = cli("predict", str(model), str(digit))  # an empty model file
    assert result.code == 2 and len(result.err.strip().splitlines()) == 1
    assert result.err.strip() == (f"digits: error: {model}: not a loadable Keras model (not a zip archive, which a "
                                  ".keras file is)")


@pytest.fixture(scope="module")
def mnist_model(tmp_path_factory, prepared_tfds) -> Path:
    """digits-net (width 0.5, augmentation on) trained 2 epochs on the first 10,000 MNIST-train digits
    (10 of 10 drawn digits right with these settings, as with all 60,000)."""
    data, _ = prepared_tfds
    home = tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DIGITS_HOME", str(home))
        config = apply_overrides(default_config("train-mnist"), [
            f"ingest.data={data}", "ingest.limit=10000", "train.width=0.5", "train.epochs=2"])
        folder = stages.start_run(config)
        make(folder, config, "examples")
        make(folder, config, "validation")
        make(folder, config, "converted")
        yield make(folder, config, "model").path


def test_drawn_digits_off_centre_on_white_are_recognised(cli, tmp_path, mnist_model):
    images = [draw_digit(d, tmp_path / f"digit-{d}.png", offset=OFFSETS[d]) for d in range(10)]
    result = cli("predict", str(mnist_model), *map(str, images))
    assert result.code == 0, result.err
    lines = [line.split("\t") for line in result.out.strip().splitlines()[1:]]  # after the header line
    assert [Path(line[0]).name for line in lines] == [p.name for p in images]
    predicted = [int(line[1]) for line in lines]
    assert all(0 < float(line[2]) <= 1 for line in lines)
    correct = sum(p == d for d, p in enumerate(predicted))
    assert correct >= 9, f"predicted {predicted} for 0..9"


def test_min_confidence_turns_unsure_labels_into_a_question_mark_with_two_candidates(cli, tmp_path):
    import keras

    from components.train import models
    from schemas.config import TrainConfig

    untrained = tmp_path / "untrained.keras"  # random weights: about 1/10 for every digit
    models.build(TrainConfig(model="baseline", augment=False), keras).save(untrained)
    digit = draw_digit(7, tmp_path / "seven.png")
    sure = cli("predict", str(untrained), str(digit), "--min-confidence", "0")
    assert sure.code == 0, sure.err
    (fields,) = [line.split("\t") for line in sure.out.rstrip("\n").splitlines() if line.startswith(str(digit))]
    assert fields[1] != "?" and fields[3] == ""  # no candidates listed for a label it is sure enough of
    unsure = cli("predict", str(untrained), str(digit), "--min-confidence", "0.9")
    (fields,) = [line.split("\t") for line in unsure.out.rstrip("\n").splitlines() if line.startswith(str(digit))]
    assert fields[1] == "?" and float(fields[2]) < 0.9
    first, second = fields[3].split(" or ")
    (sure_fields,) = [line.split("\t") for line in sure.out.splitlines() if line.startswith(str(digit))]
    assert first.startswith(f"{sure_fields[1]} (") and int(second[0]) != int(first[0])
    assert cli("predict", str(untrained), str(digit), "--min-confidence", "1.5").code == 2


def test_tensorflow_warnings_stay_off_the_stdout_that_predict_answers_on():
    """A flow run leaves Prefect's console handler on the root logger, printing to stdout; TensorFlow's own Python
    warnings ("tf.function retracing", from a predict after others in one process) must not land there, between
    the labels a script reads. The oneDNN allocator setting comes with them: malloc, unless the user chose."""
    script = ("import logging, os\n"
              "from prefect.logging.configuration import setup_logging\n"
              "from flows import setup\n"
              "setup.environment()\n"  # as the CLI, the flow and a Dask job do first
              "setup_logging()\n"  # as a flow run does: Prefect's console handler on the root logger
              "setup.console_logs_to_stdout()\n"
              "logging.getLogger('tensorflow').warning('5 out of the last 5 calls triggered tf.function retracing')\n"
              "logging.getLogger('digits.example').warning('a warning of its own')\n"
              "print('allocator', os.environ['TF_ONEDNN_USE_SYSTEM_ALLOCATOR'])\n")
    env = {k: v for k, v in os.environ.items() if k not in ("TF_ONEDNN_USE_SYSTEM_ALLOCATOR",
                                                                          "TF_CPP_MIN_LOG_LEVEL")}
    ran = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert ran.returncode == 0, ran.stderr
    assert "retracing" not in ran.stdout and "a warning of its own" in ran.stdout, ran.stdout
    assert "allocator 1" in ran.stdout
    chosen = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            env={**env, "TF_ONEDNN_USE_SYSTEM_ALLOCATOR": "0", "TF_CPP_MIN_LOG_LEVEL": "0"})
    assert "allocator 0" in chosen.stdout and "retracing" in chosen.stdout, chosen.stdout
