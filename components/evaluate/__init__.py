"""The evaluate stage: score a trained model on the validation split, draw what it gets wrong, test its
robustness, and decide whether it may become champion.

Everything is measured on the run's `val` shards (never on test): accuracy, per-class precision,
recall and F1, the 10x10 confusion matrix, a gallery of misclassified digits, and accuracy under
increasing rotation, shift and noise. The gate passes when accuracy >= the threshold AND the promotion
policy holds against the current champion re-measured on the same images in the same run (a paired
comparison), AND no val image is one the model (or a model it was fine-tuned from) was trained on —
its seen set (components.lineage); test images it has seen are reported as a warning.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from schemas.artifacts import Converted, Evaluation, Trained, sha256_file
from schemas.config import PromoteWhen
from schemas.dataset import N_CLASSES
from schemas.errors import DamagedArtifact, DigitsInputError
from schemas.runs import write_json_atomic

Progress = Callable[[str], None]
Predict = Callable[[np.ndarray], np.ndarray]  # uint8 (n, 28, 28) -> probabilities (n, 10)

ROTATIONS = (0, 5, 10, 15, 20, 30, 45)  # degrees
SHIFTS = (0, 1, 2, 3, 4, 5)  # pixels, diagonally
NOISE = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)  # standard deviation of Gaussian noise, as a fraction of full ink


@dataclass(frozen=True)
class Champion:
    """The registry's current champion, to be re-measured on this run's validation images."""

    version: str
    model_file: Path
    sha256: str | None = None  # what the registry recorded for the file


ROBUSTNESS_ROWS = 10_000  # a streamed val split's robustness sweep runs on a seeded sample of this many rows


class Split:
    """A split as evaluation reads it: its ids and labels held (16 bytes a row), its images held only when the
    split is (components.train.feed.Feed: up to train.in_memory_rows rows), else read from its shards a batch at a
    time (`outputs`, which learns the ids and labels on its first pass) or at chosen positions (`images_at`)."""

    def __init__(self, feed) -> None:
        self.feed = feed
        self._known = (feed.arrays.ids, feed.arrays.labels) if feed.in_memory else None

    @property
    def ids(self) -> np.ndarray:
        return self._ids_labels()[0]

    @property
    def labels(self) -> np.ndarray:
        return self._ids_labels()[1]

    def _ids_labels(self) -> tuple[np.ndarray, np.ndarray]:
        if self._known is None:
            ids, labels, _ = self.feed.scored()
            self._known = (ids, labels)
        return self._known

    @classmethod
    def of(cls, converted: Converted, name: str, in_memory_rows: int) -> Split:
        from components.train.feed import Feed

        return cls(Feed.of(converted.files(name), converted.counts[name], in_memory_rows))

    @property
    def in_memory(self) -> bool:
        return self.feed.in_memory

    @property
    def images(self) -> np.ndarray:
        assert self.feed.in_memory, "a streamed split's images are read with outputs() or images_at()"
        return self.feed.arrays.images

    def outputs(self, fn):
        """fn(images) over the whole split in order: one call when it is held, one per batch when it streams (a
        function of several outputs gives a list of arrays, concatenated each)."""
        if self.feed.in_memory:
            return fn(self.images)
        ids, labels, (out,) = self.feed.scored(fn)
        if self._known is None:
            self._known = (ids, labels)
        return out

    def images_at(self, positions: np.ndarray) -> np.ndarray:
        return self.feed.images_at(np.sort(positions)).images


def load_predict(model_file: Path, sha256: str | None = None) -> Predict:
    """A scoring function for a saved model: Keras in safe mode (nothing in the file runs as code), or
    pca-svm's .joblib — a pickle, which runs code when loaded, so it is loaded only when its sha256 is
    the one its producer recorded (this pipeline's train stage or registry). With sha256 given, a Keras
    file is checked against it too. Raises DigitsInputError (one line) for a file it cannot or will not load."""
    if not model_file.is_file():
        raise DigitsInputError(f"{model_file}: no such model file")
    if model_file.suffix == ".joblib" and sha256 is None:
        raise DigitsInputError(f"{model_file}: a .joblib model is a pickle and loading it runs code; digits loads one "
                               "only from its own runs and registry, which record its sha256 (use its models:/ URI)")
    if sha256 is not None and sha256_file(model_file) != sha256:
        raise DamagedArtifact(model_file, "not the model that was recorded (its sha256 differs); refusing to load it")
    if model_file.suffix == ".joblib":
        import joblib

        model = joblib.load(model_file)
        return lambda images: _one_hot(model.predict(images.reshape(len(images), -1) / 255.0))
    if model_file.suffix != ".keras":
        raise DigitsInputError(f"{model_file}: not a model file (expected .keras, or a recorded .joblib)")
    from components.keras_layers import check_classifier, load_keras_model, predict

    if not zipfile.is_zipfile(model_file):  # Keras would say "File not found" of a file that is there
        raise DigitsInputError(f"{model_file}: not a loadable Keras model (not a zip archive, which a .keras file is)")
    try:
        model = load_keras_model(model_file)
    except Exception as exc:  # Keras raises ValueError, TypeError, KeyError, OSError ... for a bad file
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise DigitsInputError(f"{model_file}: not a loadable Keras model ({type(exc).__name__}: {first})") from None
    check_classifier(model, str(model_file))
    return lambda images: predict(model, images[..., None])


def compare(labels: np.ndarray, candidate: np.ndarray, champion: np.ndarray, z: float = 1.959964) -> dict:
    """Candidate and champion on the same images: the 2x2 agreement counts, the accuracy difference with its
    95 % confidence interval (paired: only the images one gets right and the other wrong count), and the
    two-sided exact McNemar p-value (a binomial test on those discordant images)."""
    from scipy.stats import binomtest

    right_candidate, right_champion = candidate == labels, champion == labels
    n = len(labels)
    both = int((right_candidate & right_champion).sum())
    candidate_only = int((right_candidate & ~right_champion).sum())
    champion_only = int((~right_candidate & right_champion).sum())
    neither = n - both - candidate_only - champion_only
    discordant = candidate_only + champion_only
    difference = (candidate_only - champion_only) / n if n else 0.0
    # variance of the paired difference of proportions (Fleiss): ((b + c) - (b - c)^2 / n) / n^2
    spread = z * np.sqrt(max(discordant - (candidate_only - champion_only) ** 2 / n, 0.0)) / n if n else 0.0
    p_value = float(binomtest(min(candidate_only, champion_only), discordant, 0.5).pvalue) if discordant else 1.0
    return {"images": n, "candidate_accuracy": (both + candidate_only) / n if n else 0.0,
            "champion_accuracy": (both + champion_only) / n if n else 0.0, "both_right": both,
            "candidate_only_right": candidate_only,
            "champion_only_right": champion_only, "both_wrong": neither, "difference": difference,
            "ci95": [float(difference - spread), float(difference + spread)], "p_value": min(p_value, 1.0)}


def label_review(review, converted: Converted, val: Split, probabilities: np.ndarray, predict, progress: Progress,
                 in_memory_rows: int = 100_000) -> dict | None:
    """Per split (val, and test where it has labels): the model's errors, and those of them on images whose label
    the review stage doubts (its suspects.csv): errors that are probably the label's, not the model's. Test is
    scored here only to say so; nothing is chosen on it."""
    if review is None:
        return None
    import csv

    suspects: dict[str, dict[int, int]] = {}
    with review.suspects_file.open() as fh:
        for row in csv.DictReader(fh):  # train's suspects are not scored here
            suspects.setdefault(row["split"], {})[int(row["id"])] = int(row["suggested_label"])
    parts = {"val": (val, probabilities)}
    if converted.counts.get("test"):
        # from the manifest: an unlabelled split is not read at all, a labelled streamed one once (to score it)
        labelled = converted.labelled("test")
        test = None if labelled is False else Split.of(converted, "test", in_memory_rows)
        if labelled is None:
            labelled = bool((test.labels >= 0).all())
        if labelled:
            progress(f"scoring the {converted.counts['test']:,} labelled test images beside the label review "
                     "(reported only)")
            parts["test"] = (test, test.outputs(predict))
    found = {}
    for split, (arrays, scored) in parts.items():
        predicted = scored.argmax(axis=1)
        wrong = np.flatnonzero(predicted != arrays.labels)
        doubted = suspects.get(split, {})
        on_doubted = np.isin(arrays.ids, list(doubted))
        on_suspects = [int(i) for i in wrong if on_doubted[i]]
        clean = ~on_doubted
        found[split] = {
            "images": int(len(arrays.ids)), "errors": int(len(wrong)), "suspect_labels": len(doubted),
            "errors_on_suspect_labels": len(on_suspects),
            "accuracy": float((predicted == arrays.labels).mean()) if len(arrays.ids) else None,
            "accuracy_without_suspect_labels": float((predicted[clean] == arrays.labels[clean]).mean())
            if clean.any() else None,
            "examples": [{"id": int(arrays.ids[i]), "given_label": int(arrays.labels[i]),
                          "model": int(predicted[i]), "review_suggests": doubted[int(arrays.ids[i])]}
                         for i in on_suspects[:30]]}
    return found


def _one_hot(labels: np.ndarray) -> np.ndarray:
    out = np.zeros((len(labels), N_CLASSES), np.float32)
    out[np.arange(len(labels)), labels.astype(int)] = 1.0
    return out


def run(trained: Trained, converted: Converted, out_dir: Path, *, threshold: float, champion: Champion | None,
        policy: PromoteWhen = PromoteWhen.at_least_champion, alpha: float = 0.05, seen=None,
        allow_seen_val: bool = False, ood_keep: float | None = None, review=None, in_memory_rows: int = 100_000,
        progress: Progress = lambda _: None) -> Evaluation:
    """Score the model on the val split, compare it with the champion on the same images, gate it, and
    write metrics.json, the pictures and report.html into out_dir; with ood_keep, fit the out-of-distribution
    detector (components.ood) into out_dir/ood.npz; with review (the review stage's Reviewed), say which of the
    model's errors on val (and on a labelled test split) are images whose label the review doubts. A split of
    more than in_memory_rows rows is streamed: its probabilities are held, its images read a batch at a time (the
    robustness sweep then runs on a seeded sample of ROBUSTNESS_ROWS of them)."""
    from components import pages
    from components.evaluate import report

    out_dir.mkdir(parents=True, exist_ok=True)
    val = Split.of(converted, "val", in_memory_rows)
    progress(f"scoring {trained.model} on {val.feed.rows:,} validation images")
    predict = load_predict(trained.path, trained.hashes.get(trained.file))
    probabilities = val.outputs(predict)
    metrics = classification_metrics(val.labels, probabilities)
    progress("robustness sweep (rotation, shift, noise)")
    if val.in_memory:
        robustness = robustness_sweep(predict, val.images, val.labels, probabilities=probabilities)
    else:
        sample = np.sort(np.random.default_rng(0).choice(len(val.ids), min(ROBUSTNESS_ROWS, len(val.ids)),
                                                         replace=False))
        robustness = robustness_sweep(predict, val.images_at(sample), val.labels[sample],
                                      probabilities=probabilities[sample])
        robustness["sample"] = {"images": len(sample), "of": len(val.ids), "seed": 0}
    comparison = None
    if champion is not None:
        progress(f"re-measuring the champion (version {champion.version}) on the same images")
        champion_predict = load_predict(champion.model_file, champion.sha256)
        comparison = {"champion_version": champion.version, **compare(
            val.labels, probabilities.argmax(axis=1), val.outputs(champion_predict).argmax(axis=1))}
    members = member_scores(trained, val, progress)
    lineage = seen_overlaps(seen, val, converted, progress, in_memory_rows)
    seen_val = lineage["val"]["seen"] if lineage.get("val") else 0
    gate = decide(metrics["val_accuracy"], threshold, comparison, policy, alpha, seen_val=seen_val,
                  allow_seen_val=allow_seen_val)
    ood = out_of_distribution(trained, converted, val, out_dir, ood_keep, progress, in_memory_rows) if ood_keep \
        else None
    metrics = {**metrics, "gate": gate, "comparison": comparison, "model": trained.model, "val_rows": len(val.ids),
               "data_fingerprint": converted.fingerprint,
               "calibration": {**calibration(val.labels, probabilities), "scaling": trained.calibration},
               "lineage": lineage, "members": members, "ood": ood,
               "label_review": label_review(review, converted, val, probabilities, predict, progress,
                                            in_memory_rows)}
    write_json_atomic(out_dir / "metrics.json", metrics)
    write_json_atomic(out_dir / "robustness.json", robustness)
    report.confusion_png(np.array(metrics["confusion"]), out_dir / "confusion.png")
    report.errors_png(val.ids, val.labels, probabilities, val.images_at, out_dir / "errors.png")
    report.robustness_png(robustness, out_dir / "robustness.png")
    report.reliability_png(metrics["calibration"], out_dir / "reliability.png")
    report.training_png(report.histories(trained.dir), out_dir / report.TRAINING)
    report.html(metrics, robustness, out_dir / "report.html", nav=pages.nav(out_dir.parent, "evaluate",
                                                                              mlflow_run=trained.mlflow_run_id))
    progress(f"val_accuracy {metrics['val_accuracy']:.2%}; gate {'passed' if gate['passed'] else 'refused'}: "
             f"{gate['reason']}")
    return Evaluation(dir=out_dir, val_accuracy=metrics["val_accuracy"], passed=gate["passed"],
                      reason=gate["reason"], threshold=threshold, champion_version=gate["champion_version"],
                      champion_val_accuracy=gate["champion_val_accuracy"], model=trained.model, comparison=comparison,
                      seen_val=seen_val, seen_test=lineage["test"]["seen"] if lineage.get("test") else 0,
                      lineage_warning=lineage_warning(lineage), members=members,
                      ood_file=ood["file"] if ood else None)


def out_of_distribution(trained: Trained, converted: Converted, val: Split, out_dir: Path, keep: float,
                        progress: Progress = lambda _: None, in_memory_rows: int = 100_000) -> dict | None:
    """Fit the out-of-distribution detector of a single Keras model on the train split, its threshold keeping
    `keep` of the val digits, into out_dir/ood.npz; its summary for metrics.json (None: a model it does not fit,
    an ensemble or a pca-svm)."""
    from components import ood
    from components.keras_layers import load_keras_model

    if trained.path.suffix != ".keras" or trained.members:
        return None
    progress("fitting the out-of-distribution detector (Mahalanobis distance on features)")
    model = load_keras_model(trained.path, compile=False)
    from components.train.feed import Feed

    train = Feed.of(converted.files("train"), converted.counts["train"], in_memory_rows)
    # held: ood.fit draws its seeded sample; streamed: the same sample read back from the shards (only it)
    picked = train.arrays if train.in_memory else train.images_at(ood.sample(train.rows))
    images, labels = picked.images, picked.labels
    detector = ood.fit(model, trained.hashes.get(trained.file) or sha256_file(trained.path), images, labels,
                       val.images if val.in_memory else (batch.images for batch in val.feed.batches()), keep=keep)
    detector.save(out_dir / ood.FILE)
    return {"method": ood.METHOD, "file": ood.FILE, "keep": keep, "threshold": detector.threshold,
            "val_kept": detector.val_kept, "layers": list(detector.layers)}


def member_scores(trained: Trained, val: Split, progress: Progress = lambda _: None) -> list[dict] | None:
    """An ensemble's members, each scored alone on the same val images (None for a single model)."""
    if not trained.members:
        return None
    from components.keras_layers import load_keras_model, predict
    from components.train.ensemble import members_of

    progress(f"scoring each of the {len(trained.members)} members alone" if len(trained.members) > 1 else
             "scoring the member alone (without the test-time shifts)")
    import keras

    model = load_keras_model(trained.path, compile=False)
    image = keras.Input(model.inputs[0].shape[1:], name="members_input")
    each = keras.Model(image, [member(image) for member in members_of(model)])  # all members in one pass
    outputs = val.outputs(lambda images: (lambda out: out if isinstance(out, list) else [out])(  # Keras unwraps
        predict(each, images[..., None])))  # a list of one output
    return [{"name": record["name"], "model": record["model"], "seed": record["seed"],
             "val_accuracy": float((np.asarray(probabilities).argmax(axis=1) == val.labels).mean()),
             "worker": record.get("worker")} for record, probabilities in zip(trained.members, outputs)]


def seen_overlaps(seen, val: Split, converted: Converted, progress: Progress = lambda _: None,
                  in_memory_rows: int = 100_000) -> dict:
    """This run's val and test images looked up in the model's seen set (components.lineage.SeenSet; None:
    unknown, a model trained before digits recorded them)."""
    if seen is None:
        return {"known": False, "complete": False, "chain": [], "seen_images": None, "val": None, "test": None}
    progress(f"looking the val and test images up in the {seen.images:,} images the model has seen")
    test = None
    if converted.counts.get("test"):
        test = _overlap(seen, Split.of(converted, "test", in_memory_rows)).summary()
    return {"known": True, "complete": seen.complete, "chain": seen.chain, "seen_images": seen.images,
            "val": _overlap(seen, val).summary(), "test": test}


def _overlap(seen, split: Split):
    if split.in_memory:
        return seen.overlap(split.images, split.ids)
    from components.lineage import EXAMPLES_SHOWN, Overlap

    parts = [seen.overlap(batch.images, batch.ids) for batch in split.feed.batches()]
    return Overlap(sum(p.images for p in parts), sum(p.exact for p in parts), sum(p.shifted for p in parts),
                   [i for p in parts for i in p.example_ids][:EXAMPLES_SHOWN])


def lineage_warning(lineage: dict) -> str | None:
    """One line when test images (or, allowed, val images) were seen in training, or the lineage is unknown."""
    from components.lineage import describe_chain

    parts = []
    if lineage.get("test") and lineage["test"]["seen"]:
        t = lineage["test"]
        shifted = f" ({t['shifted']:,} shifted copies)" if t["shifted"] else ""
        parts.append(f"{t['seen']:,} of {t['images']:,} test images{shifted} were seen in training (ids "
                     f"{', '.join(map(str, t['example_ids']))}{', ...' if t['seen'] > len(t['example_ids']) else ''}): "
                     "accuracy on them says nothing about new digits")
    if not lineage.get("known"):
        parts.append("the model records no seen images (trained before digits kept them): overlap not checked")
    elif not lineage.get("complete"):
        parts.append(f"part of the lineage is unknown ({describe_chain(lineage['chain'])}): overlap checked "
                     "against the known part only")
    return "; ".join(parts) or None

def classification_metrics(labels: np.ndarray, probabilities: np.ndarray) -> dict:
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    predicted = probabilities.argmax(axis=1)
    classes = list(range(N_CLASSES))
    precision, recall, f1, support = precision_recall_fscore_support(labels, predicted, labels=classes,
                                                                     zero_division=0)
    return {
        "val_accuracy": float((predicted == labels).mean()),
        "per_class": {str(c): {"precision": float(precision[c]), "recall": float(recall[c]), "f1": float(f1[c]),
                               "support": int(support[c])} for c in classes},
        "confusion": confusion_matrix(labels, predicted, labels=classes).tolist(),
    }


def decide(accuracy: float, threshold: float, comparison: dict | None,
           policy: PromoteWhen = PromoteWhen.at_least_champion, alpha: float = 0.05, *, seen_val: int = 0,
           allow_seen_val: bool = False) -> dict:
    """The gate: the value threshold AND, against the champion measured on the same validation images
    (comparison, see compare), the promotion policy: at least as accurate; significantly better (McNemar's
    p < alpha and more accurate); or not significantly worse. AND none of the val images was seen in
    training (seen_val, see seen_overlaps): otherwise the score is contaminated, unless allow_seen_val."""
    above_threshold = accuracy >= threshold
    against = "no champion yet"
    beats_champion = True
    champion_accuracy = None
    if comparison is not None:
        difference, p_value = comparison["difference"], comparison["p_value"]
        champion_accuracy = comparison["champion_accuracy"]
        significant = p_value < alpha
        beats_champion = {PromoteWhen.at_least_champion: difference >= 0,
                          PromoteWhen.significantly_better: difference > 0 and significant,
                          PromoteWhen.not_significantly_worse: not (difference < 0 and significant)}[policy]
        low, high = comparison["ci95"]
        against = (f"{'>=' if difference >= 0 else 'below'} champion version {comparison['champion_version']}'s "
                   f"{champion_accuracy:.4%} on the same validation data (difference {100 * difference:+.2f} pt, "
                   f"95 % CI {100 * low:+.2f} to {100 * high:+.2f} pt, McNemar p = {p_value:.3g}; {policy.value}: "
                   f"{'met' if beats_champion else 'not met'})")
    reason = (f"val_accuracy {accuracy:.4%} {'>=' if above_threshold else 'is below'} the threshold "
              f"{threshold:.2%}; {against}")
    clean = True
    if seen_val:
        seen = (f"the val split holds {seen_val:,} images this model (or a model it was fine-tuned from) was "
                "trained on")
        if allow_seen_val:
            reason += f"; {seen} (allowed by evaluate.allow_seen_val=true)"
        else:
            clean = False
            reason = (f"{seen}: its val score is contaminated (--set evaluate.allow_seen_val=true to promote "
                      f"anyway); {reason}")
    return {"passed": above_threshold and beats_champion and clean, "threshold": threshold, "policy": policy.value,
            "alpha": alpha, "champion_version": comparison["champion_version"] if comparison else None,
            "champion_val_accuracy": champion_accuracy, "reason": reason, "seen_val": seen_val,
            "allow_seen_val": allow_seen_val}


CALIBRATION_BINS = 15


def calibration(labels: np.ndarray, probabilities: np.ndarray, bins: int = CALIBRATION_BINS) -> dict:
    """How well the top probability matches how often the model is right: the reliability table (the top
    probabilities cut into equal-width bins; per bin its images, mean confidence and accuracy) and the
    expected calibration error (ECE: the bins' |accuracy - confidence| weighted by their share of images)."""
    confidence = probabilities.max(axis=1)
    right = probabilities.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    table, ece = [], 0.0
    for b in range(bins):
        members = which == b
        count = int(members.sum())
        if not count:
            continue
        mean_confidence, accuracy = float(confidence[members].mean()), float(right[members].mean())
        ece += count / len(labels) * abs(accuracy - mean_confidence)
        table.append({"low": float(edges[b]), "high": float(edges[b + 1]), "images": count,
                      "confidence": mean_confidence, "accuracy": accuracy})
    return {"ece": float(ece), "bins": bins, "reliability": table,
            "mean_confidence": float(confidence.mean()) if len(labels) else 0.0,
            "accuracy": float(right.mean()) if len(labels) else 0.0}


ROBUSTNESS_CHUNK = 8192  # val rows perturbed at a time: a multiple of predict's 256-row batches (the same scores)


def robustness_sweep(predict: Predict, images: np.ndarray, labels: np.ndarray, seed: int = 0,
                     probabilities: np.ndarray | None = None) -> dict:
    """Accuracy on the validation images rotated, shifted and noised by increasing amounts; `probabilities`:
    the model's for the images as they are, when the caller has them already. The images are perturbed
    ROBUSTNESS_CHUNK rows at a time (a held val split of 100,000 rows took 1.2 GB of float64 noise at once); the
    noise is drawn in the same order, so the numbers are those of the whole split perturbed at once."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    # each sweep's first point is the images as they are: scored once (or not at all), not thrice
    scores = predict(images) if probabilities is None else probabilities
    unperturbed = float((scores.argmax(axis=1) == labels).mean())

    def rotated(chunk: np.ndarray, angle: float) -> np.ndarray | None:
        if not angle:
            return None
        return np.clip(ndimage.rotate(chunk.astype(np.float32), angle, axes=(2, 1), reshape=False, order=1),
                       0, 255).round().astype(np.uint8)

    def shifted(chunk: np.ndarray, pixels: int) -> np.ndarray | None:
        if not pixels:
            return None
        return ndimage.shift(chunk, (0, pixels, pixels), order=0, mode="constant", cval=0)

    def noisy(chunk: np.ndarray, sigma: float) -> np.ndarray | None:
        noise = rng.normal(0, sigma * 255, chunk.shape)  # drawn at sigma 0 too: later sigmas keep their draws
        if not sigma:
            return None
        return np.clip(chunk + noise, 0, 255).round().astype(np.uint8)

    def swept(perturb, levels) -> dict[str, float]:
        found = {}
        for level in levels:
            right, as_is = 0, False
            for start in range(0, len(images), ROBUSTNESS_CHUNK):
                changed = perturb(images[start:start + ROBUSTNESS_CHUNK], level)
                if changed is None:  # the images as they are
                    as_is = True
                    continue
                right += int((predict(changed).argmax(axis=1) == labels[start:start + ROBUSTNESS_CHUNK]).sum())
            found[str(level)] = unperturbed if as_is else right / len(labels)
        return found

    return {"rotation_degrees": swept(rotated, ROTATIONS), "shift_pixels": swept(shifted, SHIFTS),
            "noise_sigma": swept(noisy, NOISE)}


def read_metrics(evaluate_dir: Path) -> dict:
    return json.loads((evaluate_dir / "metrics.json").read_text())
