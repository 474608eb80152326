"""The review stage: labels that are probably wrong, found by confident learning, for a person to check.

Every train and val image is scored by a model that never trained on it: K-fold cross-fitting over train + val
(stratified by label, seeded), one model of review.model per fold trained on the other K-1 folds (at least
review.min_steps optimizer steps). Those out-of-sample probabilities are temperature-scaled (confident learning
assumes calibrated probabilities), then cleanlab's `find_label_issues` (confident learning: Northcutt, Jiang &
Chuang, JAIR 2021, pruned by noise rate) picks the images whose given label they contradict, ranked by
self-confidence (the probability of the given label, lowest first), and its confident joint estimates the share
of wrong labels per class. A test split with
labels (MNIST, noisy) is scored by the average of the K models — none trained on it — and reviewed the same way,
beside the others: reported only, never used to train or choose anything.

review/
  suspects.csv          id,split,given_label,suggested_label,quality,suggested_probability: the suspects, most
                        suspect first (train and val, then test)
  review-decisions.csv  id,decision for every train/val suspect, prefilled with the suggested digit: a person
                        edits it (a digit to relabel, `drop`, or the row deleted to keep the label) and gives it to
                        ingest (`--set ingest.review=PATH`): components.ingest.review applies it
  review.json           counts, the estimated share of wrong labels (overall, per class, per class pair), folds
  report.html           the top suspects as a gallery (image, given -> suggested, probability), the class pairs,
                        the share per class
  folds/fold-NN/        each fold's model and out-of-sample probabilities: a review stopped midway redoes only
                        the folds it had not finished
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from schemas.artifacts import Converted, Reviewed
from schemas.config import ReviewConfig, TrainConfig
from schemas.dataset import N_CLASSES
from schemas.errors import DigitsInputError
from schemas.runs import write_csv_atomic, write_json_atomic

Progress = Callable[[str], None]
SUSPECTS, DECISIONS, SUMMARY, REPORT = Reviewed.SUSPECTS, Reviewed.DECISIONS, Reviewed.SUMMARY, Reviewed.REPORT
FOLDS = "folds"
PROBABILITIES = "probabilities.npz"  # in each fold's folder: ids and out-of-sample probabilities (and test's)
SUSPECT_COLUMNS = ("id", "split", "given_label", "suggested_label", "quality", "suggested_probability")


@dataclass
class Scored:
    """Labelled images with probabilities from models that never trained on them."""

    ids: np.ndarray  # int64 (n,)
    splits: np.ndarray  # str (n,): train | val | test
    labels: np.ndarray  # int64 (n,)
    images: np.ndarray  # uint8 (n, 28, 28)
    probabilities: np.ndarray  # float64 (n, 10)
    epochs: int = 0  # each fold model's epochs (review.epochs, or more on small data)


def fold_of(labels: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Each image's fold (0..folds-1): stratified by label, seeded, every class spread evenly over the folds."""
    rng = np.random.default_rng(seed)
    assignment = np.empty(len(labels), np.int64)
    offset = 0
    for label in range(N_CLASSES):
        members = np.flatnonzero(labels == label)
        rng.shuffle(members)
        assignment[members] = (np.arange(len(members)) + offset) % folds  # offset: small classes fill folds evenly
        offset += len(members)
    return assignment


def fold_config(review: ReviewConfig, rows: int) -> TrainConfig:
    """The settings each fold's model trains with on `rows` images: review.model at review.width for review.epochs
    (more on small data: at least review.min_steps optimizer steps), without augmentation or label smoothing (the
    probabilities of the labels as given, quickly); train's defaults else (the review does not change when
    train's settings do)."""
    config = TrainConfig(model=review.model, width=review.width, epochs=review.epochs, augment=False,
                         label_smoothing=0.0)
    steps_per_epoch = max(1, -(-rows // config.batch_size))
    return config.model_copy(update={"epochs": max(review.epochs, -(-review.min_steps // steps_per_epoch))})


def cross_fit(converted: Converted, review: ReviewConfig, seed: int, work_dir: Path, *,
              progress: Progress = lambda _: None) -> Scored:
    """Out-of-sample probabilities for every train and val image (and every labelled test image: the folds'
    models averaged), each fold trained once (a fold whose probabilities.npz is there with this signature is
    not trained again)."""
    from components import records
    from components.train import CHECKPOINTS, fit_keras, models, phase, prepare_work_dir
    from components.train.feed import Feed
    from schemas import examples as ex

    parts = {split: records.load(converted.files(split)) for split in ("train", "val")}
    ids = np.concatenate([parts[s].ids for s in parts])
    labels = np.concatenate([parts[s].labels for s in parts]).astype(np.int64)
    images = np.concatenate([parts[s].images for s in parts])
    splits = np.concatenate([np.full(len(parts[s].ids), s) for s in parts])
    test = None  # an unlabelled test split (Kaggle's) is not read: nothing to review there
    if converted.counts.get("test") and converted.labelled("test") is not False:
        test = records.load(converted.files("test"))
        if (test.labels < 0).any():
            test = None
    if len(labels) < review.folds * 2:
        raise DigitsInputError(f"review.folds={review.folds}: {len(labels)} labelled images are too few to split")
    folds = fold_of(labels, review.folds, seed)
    config = fold_config(review, int(np.bincount(folds).max() * (review.folds - 1)))
    probabilities = np.zeros((len(labels), N_CLASSES))
    test_probabilities = np.zeros((len(test.ids), N_CLASSES)) if test is not None else None
    signature = {"data": converted.digest, "folds": review.folds, "seed": seed,
                 "config": config.model_dump(mode="json")}
    for fold in range(review.folds):
        held_out = folds == fold
        fold_dir = work_dir / FOLDS / f"fold-{fold:02d}"
        done = fold_dir / PROBABILITIES
        if not _finished(done, signature):
            progress(f"fold {fold + 1} of {review.folds}: training {config.model.value} on "
                     f"{int((~held_out).sum()):,} images, scoring the {int(held_out.sum()):,} it does not see")
            resume = prepare_work_dir(fold_dir, signature)  # an interrupted fold resumes at its next epoch
            fit = ex.Arrays(ids[~held_out], labels[~held_out], images[~held_out])
            held = ex.Arrays(ids[held_out], labels[held_out], images[held_out])
            trained = fit_keras(Feed.held(fit), Feed.held(held), config, seed + fold, fold_dir, signature, resume, None,
                                lambda line, fold=fold: progress(f"fold {fold + 1}: {line}"),
                                build=lambda keras: models.build(config, keras),
                                segments=[phase(0, config.epochs, config.learning_rate, config)],
                                name=config.model.value)
            _score(trained.dir / trained.file, held, test, signature, done)
            shutil.rmtree(fold_dir / CHECKPOINTS, ignore_errors=True)  # scored: its model.keras is what stays
        with np.load(done) as saved:
            if not np.array_equal(saved["ids"], ids[held_out]):
                raise DigitsInputError(f"{done}: scored other images than fold {fold}'s; delete {fold_dir} to redo it")
            probabilities[held_out] = saved["probabilities"]
            if test_probabilities is not None:
                test_probabilities += saved["test_probabilities"] / review.folds
    scored = Scored(ids, splits, labels, images, probabilities, config.epochs)
    if test is None:
        return scored
    return Scored(np.concatenate([ids, test.ids]), np.concatenate([splits, np.full(len(test.ids), "test")]),
                  np.concatenate([labels, test.labels.astype(np.int64)]), np.concatenate([images, test.images]),
                  np.concatenate([probabilities, test_probabilities]), config.epochs)


def _finished(done: Path, signature: dict) -> bool:
    if not done.is_file():
        return False
    try:
        with np.load(done) as saved:
            return json.loads(str(saved["signature"])) == signature
    except (OSError, ValueError, KeyError):
        return False


def _score(model_file: Path, held, test, signature: dict, done: Path) -> None:
    from components.keras_layers import load_keras_model, predict

    model = load_keras_model(model_file)
    held_out = np.asarray(predict(model, held.images[..., None]), np.float64)
    on_test = (np.asarray(predict(model, test.images[..., None]), np.float64) if test is not None
               else np.zeros((0, N_CLASSES)))
    partial = done.with_name("probabilities.partial.npz")
    with partial.open("wb") as fh:
        np.savez(fh, ids=held.ids, probabilities=held_out, test_probabilities=on_test,
                 signature=np.array(json.dumps(signature)))
    os.replace(partial, done)


def calibrated(labels: np.ndarray, probabilities: np.ndarray) -> tuple[np.ndarray, float]:
    """The out-of-sample probabilities temperature-scaled (components.calibrate: the T that minimises the labels'
    negative log-likelihood), and T. Confident learning's per-class thresholds assume calibrated probabilities; the
    folds' models, trained briefly without label smoothing, need not be."""
    from components.calibrate import fit_temperature, scaled

    if len(labels) == 0:
        return probabilities, 1.0
    temperature = fit_temperature(probabilities, labels)
    return scaled(probabilities, temperature), temperature


def find_issues(labels: np.ndarray, probabilities: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(indices of the label issues, most suspect first; every image's label quality in 0..1) by confident
    learning (cleanlab.filter.find_label_issues, pruned by noise rate, ranked by self-confidence) on
    calibrated probabilities."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    if len(labels) == 0:
        return np.zeros(0, np.int64), np.zeros(0)
    probabilities = _all_classes(probabilities)
    issues = find_label_issues(labels, probabilities, filter_by="prune_by_noise_rate",
                               return_indices_ranked_by="self_confidence", n_jobs=1)
    quality = get_label_quality_scores(labels, probabilities, method="self_confidence")
    return np.asarray(issues, np.int64), np.asarray(quality, np.float64)


def _all_classes(probabilities: np.ndarray) -> np.ndarray:
    """Probabilities rescaled to sum to 1 in float64 (cleanlab checks the sums strictly)."""
    probabilities = np.clip(probabilities.astype(np.float64), 1e-12, None)
    return probabilities / probabilities.sum(axis=1, keepdims=True)


def wrong_label_shares(labels: np.ndarray, probabilities: np.ndarray) -> tuple[float, list[float], np.ndarray]:
    """Confident learning's estimate of the share of wrong labels: overall, per given class, and the joint
    distribution of (given label, true label) as a 10 x 10 matrix summing to 1."""
    from cleanlab.count import estimate_joint

    present = np.bincount(labels, minlength=N_CLASSES) > 0
    if not present.all():  # cleanlab needs every class among the given labels
        return float("nan"), [float("nan")] * N_CLASSES, np.full((N_CLASSES, N_CLASSES), np.nan)
    joint = np.asarray(estimate_joint(labels, _all_classes(probabilities)), np.float64)
    per_class = [float(1 - joint[i, i] / joint[i].sum()) if joint[i].sum() > 0 else 0.0 for i in range(N_CLASSES)]
    return float(1 - np.trace(joint)), per_class, joint


def run(converted: Converted, review: ReviewConfig, seed: int, out_dir: Path, *, tracking=None,
        progress: Progress = lambda _: None) -> Reviewed:
    """Cross-fit, find the issues, write the stage's files, log them to the stage's MLflow run (tracking); the
    gate (review.warn_share, review.fail_share) is the caller's (flows.stages.review_gate)."""
    scored = cross_fit(converted, review, seed, out_dir, progress=progress)
    progress("finding label issues (confident learning)")
    labelled = scored.splits != "test"
    summary: dict = {"folds": review.folds, "model": review.model.value, "width": review.width,
                     "epochs": scored.epochs, "splits": {}}
    rows = []
    for name, mask in (("train+val", labelled), ("test", ~labelled)):
        if not mask.any():
            continue
        index = np.flatnonzero(mask)
        labels, probabilities = scored.labels[index], scored.probabilities[index]
        accuracy = float((probabilities.argmax(axis=1) == labels).mean())
        probabilities, temperature = calibrated(labels, probabilities)
        issues, quality = find_issues(labels, probabilities)
        share, per_class, joint = wrong_label_shares(labels, probabilities)
        suggested = probabilities.argmax(axis=1)
        pairs: dict[str, int] = {}
        for i in issues:
            key = f"{labels[i]}->{suggested[i]}"
            pairs[key] = pairs.get(key, 0) + 1
        summary["splits"][name] = {
            "images": int(len(index)), "suspects": int(len(issues)), "out_of_sample_accuracy": accuracy,
            "temperature": temperature,
            "estimated_wrong_share": share, "estimated_wrong_share_per_class": per_class,
            "joint": joint.round(6).tolist(), "suspect_pairs": dict(sorted(pairs.items(), key=lambda kv: -kv[1]))}
        for i in issues:
            rows.append((int(scored.ids[index[i]]), str(scored.splits[index[i]]), int(labels[i]), int(suggested[i]),
                         float(quality[i]), float(probabilities[i, suggested[i]]), index[i]))
    write_csv_atomic(out_dir / SUSPECTS, SUSPECT_COLUMNS,
                     [(i, s, g, sug, f"{q:.6f}", f"{p:.6f}") for i, s, g, sug, q, p, _ in rows])
    write_csv_atomic(out_dir / DECISIONS, ("id", "decision"), [(i, sug) for i, s, _, sug, *_ in rows if s != "test"])
    _report(out_dir / REPORT, summary, rows, scored.images, gallery=review.gallery)
    main = summary["splits"].get("train+val", {})
    reviewed = Reviewed(dir=out_dir, images=main.get("images", 0), suspects=main.get("suspects", 0),
                        estimated_wrong_share=main.get("estimated_wrong_share"),
                        test_suspects=summary["splits"].get("test", {}).get("suspects"),
                        out_of_sample_accuracy=main.get("out_of_sample_accuracy"))
    write_json_atomic(out_dir / SUMMARY, summary)
    if tracking is not None:
        _log(tracking, review, summary, out_dir)
        reviewed = dataclasses.replace(reviewed, mlflow_run_id=tracking.run_id)
    share = reviewed.estimated_wrong_share
    progress(f"{reviewed.suspects:,} suspect labels of {reviewed.images:,} (estimated wrong: "
             f"{share:.2%})" if share == share else f"{reviewed.suspects:,} suspect labels of {reviewed.images:,}")
    return reviewed


def _log(tracking, review: ReviewConfig, summary: dict, out_dir: Path) -> None:
    """The stage's MLflow run: its settings, the estimates (overall and per class) and its files."""
    tracking.start(None, {f"review.{k}": v for k, v in review.model_dump(mode="json").items()})
    metrics = {}
    for name, part in summary["splits"].items():
        prefix = "review_test_" if name == "test" else "review_"
        metrics.update({f"{prefix}suspects": part["suspects"], f"{prefix}images": part["images"],
                        f"{prefix}out_of_sample_accuracy": part["out_of_sample_accuracy"]})
        if part["estimated_wrong_share"] == part["estimated_wrong_share"]:  # not NaN (a class absent)
            metrics[f"{prefix}estimated_wrong_share"] = part["estimated_wrong_share"]
            metrics.update({f"{prefix}estimated_wrong_share_{d}": v
                            for d, v in enumerate(part["estimated_wrong_share_per_class"])})
    tracking.log_files(out_dir / SUSPECTS, out_dir / SUMMARY, out_dir / REPORT)
    tracking.finish(metrics, step=0)


def _report(path: Path, summary: dict, rows: list, images: np.ndarray, *, gallery: int) -> None:
    """report.html: per reviewed part, its numbers, the share of wrong labels per class, the class pairs, and
    the first `gallery` suspects as pictures (image, given -> suggested, the suggestion's probability)."""
    import html

    from components import pages

    body = ["<h1>Label review</h1>",
            f"<p>Confident learning on out-of-sample probabilities: {summary['folds']} folds, each scored by a "
            f"{html.escape(summary['model'])} (width {summary['width']:g}, {summary['epochs']} epochs) trained on the "
            "other folds. Suspects are labels those probabilities contradict; the share of wrong labels is "
            "confident learning's estimate. Review them, then edit <a href=\"review-decisions.csv\">"
            "review-decisions.csv</a> (a digit to relabel, <code>drop</code>, or delete the row to keep the label) and "
            "run again with <code>--set ingest.review=PATH</code>. All suspects: <a href=\"suspects.csv\">"
            "suspects.csv</a>.</p>"]
    for name, part in summary["splits"].items():
        shown = [r for r in rows if (r[1] == "test") == (name == "test")][:gallery]
        share = part["estimated_wrong_share"]
        body.append(f"<h2>{'Test split (reported only: never used to train or choose)' if name == 'test' else 'Train and val'}"
                    "</h2>")
        body.append(f"<p>{part['suspects']:,} suspects of {part['images']:,} images; estimated share of wrong labels "
                    f"{_percent(share)}; out-of-sample accuracy {part['out_of_sample_accuracy']:.2%}.</p>")
        body.append("<table><tr><th>given label</th>" + "".join(f"<th>{d}</th>" for d in range(N_CLASSES)) +
                    "</tr><tr><th>estimated wrong</th>" +
                    "".join(f"<td>{_percent(v)}</td>" for v in part["estimated_wrong_share_per_class"]) + "</tr></table>")
        if part["suspect_pairs"]:
            body.append("<table><tr><th>given -> suggested</th><th>suspects</th></tr>" + "".join(
                f"<tr><td>{html.escape(k)}</td><td>{v}</td></tr>" for k, v in part["suspect_pairs"].items()) + "</table>")
        if shown:
            body.append(f"<p>The {len(shown)} most suspect:</p><div class=\"gallery\">" + "".join(
                f'<figure><img alt="id {i}" src="data:image/png;base64,{_png(images[at])}">'
                f"<figcaption>{html.escape(split)} id {i}<br>{given} &rarr; <b>{suggested}</b> ({p:.0%})</figcaption></figure>"
                for i, split, given, suggested, _, p, at in shown) + "</div>")
    style = ("<style>.gallery{display:flex;flex-wrap:wrap;gap:6px} figure{margin:0;text-align:center;font-size:12px;"
             "width:92px} figure img{width:84px;height:84px;image-rendering:pixelated;margin:0 auto;"
             "border:1px solid #ccc}</style>")
    run_dir = path.parent.parent
    pages.write(path, "Label review", style + "\n".join(body), pages.nav(run_dir, "review"))


def _percent(value: float) -> str:
    return "n/a" if value != value else f"{value:.2%}"


def _png(image: np.ndarray) -> str:
    """A 28x28 digit as a base64 PNG, dark ink on white as people see a digit."""
    import base64
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(255 - image.astype(np.uint8)).save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode()
