"""Exploratory summaries a person looks at first: label counts, class means, intensities, duplicates."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from components.ingest.splits import SplitData
from schemas.dataset import IMAGE_SIDE, N_CLASSES, PIXEL_MAX, Split

_EXAMPLES = 10  # duplicate pairs listed in duplicates.json


class Explorer:
    """The EDA's numbers gathered piece by piece as a split streams past (memory does not grow with the rows but
    for 24 bytes a row of duplicate keys): label counts, per-class pixel sums, intensity histograms, and a 128-bit
    key (SHA-1) of each image with its id for exact duplicates. `write` draws and saves them."""

    def __init__(self) -> None:
        self.counts: dict[str, np.ndarray | None] = {}
        self.histogram: dict[str, np.ndarray] = {}
        self.images: dict[str, int] = {}
        self.class_sums = np.zeros((N_CLASSES, IMAGE_SIDE, IMAGE_SIDE))
        self.class_counts = np.zeros(N_CLASSES, np.int64)
        self.keys: dict[str, list[np.ndarray]] = {}
        self.ids: dict[str, list[np.ndarray]] = {}

    def add(self, split: Split, piece: SplitData) -> None:
        name = split.value
        if name not in self.images:
            self.images[name] = 0
            self.counts[name] = None if piece.labels is None else np.zeros(N_CLASSES, np.int64)
            self.histogram[name] = np.zeros(PIXEL_MAX + 1, np.int64)
            self.keys[name], self.ids[name] = [], []
        self.images[name] += len(piece.pixels)
        self.histogram[name] += np.bincount(piece.pixels.reshape(-1), minlength=PIXEL_MAX + 1)
        if piece.labels is not None:
            self.counts[name] += np.bincount(piece.labels, minlength=N_CLASSES)
            if split is Split.train:
                for digit in range(N_CLASSES):
                    chosen = piece.pixels[piece.labels == digit]
                    self.class_sums[digit] += chosen.sum(axis=0, dtype=np.float64)
                    self.class_counts[digit] += len(chosen)
        self.keys[name].append(image_keys(piece.pixels))
        self.ids[name].append(np.asarray(piece.ids, np.int64))

    def write(self, out: Path) -> dict:
        """Write PNG + JSON summaries into out; return the JSON-able summary."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        out.mkdir(parents=True, exist_ok=True)
        counts = {name: None if c is None else c.tolist() for name, c in self.counts.items()}
        _dump(out / "label_counts.json", counts)
        _label_counts_png(plt, counts, out / "label_counts.png")
        _class_means_png(plt, self.class_sums, self.class_counts, self.counts.get(Split.train.value) is not None,
                         out / "class_means.png")
        histogram = {name: h.tolist() for name, h in self.histogram.items()}
        _dump(out / "intensity_histogram.json", histogram)
        _histogram_png(plt, histogram, out / "intensity_histogram.png")
        joined = {name: (np.concatenate(k) if k else np.empty(0, "V16"),
                         np.concatenate(self.ids[name]) if k else np.empty(0, np.int64)) for name, k in self.keys.items()}
        duplicates = find_duplicates(joined[Split.train.value], joined.get(Split.test.value))
        _dump(out / "duplicates.json", duplicates)
        _page(out, self.images, counts, histogram, duplicates)
        return {"label_counts": counts,
                "duplicates": {k: v for k, v in duplicates.items() if not k.endswith("examples")}}


def image_keys(pixels: np.ndarray) -> np.ndarray:
    """A 16-byte key per image (the first 16 bytes of the SHA-1 of its 784 pixels): equal images, equal keys; two
    different images share one with a probability of about 2**-128."""
    flat = np.ascontiguousarray(pixels).reshape(len(pixels), -1)
    view, width = memoryview(flat.tobytes()), flat.shape[1]
    digests = b"".join(hashlib.sha1(view[i * width:(i + 1) * width], usedforsecurity=False).digest()[:16]
                       for i in range(len(flat)))
    return np.frombuffer(digests, dtype="V16")


PAGE = "index.html"


def _page(out: Path, images: dict[str, int], counts: dict, histogram: dict, duplicates: dict) -> None:
    """eda/index.html: the pictures with their numbers (no scripts; opens offline)."""
    import html

    from components import pages

    e = html.escape
    labelled = {k: v for k, v in counts.items() if v is not None}
    head = "".join(f"<th>{d}</th>" for d in range(N_CLASSES))
    rows = "".join(f"<tr><th>{e(split)}</th>" + "".join(f"<td>{v:,}</td>" for v in values)
                   + f"<td><b>{sum(values):,}</b></td><td>{min(values) / max(max(values), 1):.2f}</td></tr>"
                   for split, values in labelled.items())
    unlabelled = [split for split, values in counts.items() if values is None]
    intensity = "".join(
        f"<tr><th>{e(split)}</th><td>{images[split]:,}</td>"
        f"<td>{100 * values[0] / max(sum(values), 1):.1f} %</td>"
        f"<td>{100 * sum(values[128:]) / max(sum(values), 1):.1f} %</td>"
        f"<td>{np.dot(np.arange(PIXEL_MAX + 1), values) / max(sum(values), 1):.1f}</td></tr>"
        for split, values in histogram.items())
    examples = "".join(f"<li>train ids {', '.join(map(str, group[:6]))}</li>" for group in duplicates["train_examples"])
    examples += "".join(f"<li>train ids {', '.join(map(str, pair['train_ids'][:4]))} = test ids "
                        f"{', '.join(map(str, pair['test_ids'][:4]))}</li>" for pair in duplicates["train_test_examples"])
    body = f"""<h1>Exploratory data analysis</h1>
<h2>Label counts</h2><table><tr><th>split</th>{head}<th>rows</th><th>smallest / largest class</th></tr>{rows}</table>
{f"<p>Unlabelled: {e(', '.join(unlabelled))}.</p>" if unlabelled else ""}
<img alt="label counts" src="label_counts.png">
<h2>Mean training image per class</h2><p>What the average digit of each class looks like: a blurred, upright,
centred digit is what the model expects; a sideways or off-centre mean points at transposed or shifted images.</p>
<img alt="class means" src="class_means.png">
<h2>Pixel intensities</h2><table><tr><th>split</th><th>images</th><th>background (0)</th><th>ink (&ge; 128)</th>
<th>mean intensity</th></tr>{intensity}</table><img alt="intensity histogram" src="intensity_histogram.png">
<h2>Duplicates</h2><p>{duplicates["train_duplicate_rows"]:,} train rows repeat another train image
({duplicates["train_duplicate_groups"]:,} groups); {duplicates["train_test_shared_rows"]:,} test rows are also train
images ({duplicates["train_test_shared_groups"]:,} groups): validation checks that none leak.</p>
{f"<ul>{examples}</ul>" if examples else ""}
<p>The numbers as JSON: <a href="label_counts.json">label_counts.json</a>,
<a href="intensity_histogram.json">intensity_histogram.json</a>, <a href="duplicates.json">duplicates.json</a>.</p>"""
    pages.write(out / PAGE, "digits: exploratory data analysis", body, pages.nav(out.parent.parent, "ingest/eda"))


def find_duplicates(train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray] | None) -> dict:
    """Exact-duplicate images within train and shared by train and test, from (image keys, ids) of each split:
    counts, and example groups by their first train id."""
    keys = np.concatenate([train[0], test[0]]) if test is not None else train[0]
    n_train = len(train[0])
    is_train = np.arange(len(keys)) < n_train
    found = _same_keys(keys)
    within, across = [], []
    within_rows = across_rows = 0
    for group in sorted(found, key=lambda g: int(g[0])):  # in file order: the earliest rows first
        tr, te = group[is_train[group]], group[~is_train[group]]
        if len(tr) > 1:
            within_rows += len(tr) - 1
            within.append([int(train[1][i]) for i in tr])
        if len(tr) and len(te):
            across_rows += len(te)
            across.append({"train_ids": [int(train[1][i]) for i in tr],
                           "test_ids": [int(test[1][i - n_train]) for i in te]})
    return {"train_duplicate_rows": within_rows, "train_duplicate_groups": len(within),
            "train_test_shared_rows": across_rows, "train_test_shared_groups": len(across),
            "train_examples": within[:_EXAMPLES], "train_test_examples": across[:_EXAMPLES]}


def _same_keys(keys: np.ndarray) -> list[np.ndarray]:
    """The positions of the rows whose key another row shares, one ascending array per key. Sorted by their
    first 8 bytes as integers (fast; numpy sorts 16-byte void keys ~20x slower), then the few rows that share
    those compared on all 16."""
    if not len(keys):
        return []
    first = np.ascontiguousarray(keys).view(np.uint64)[::2]
    _, inverse, counts = np.unique(first, return_inverse=True, return_counts=True)
    candidates = np.flatnonzero(counts[inverse] > 1)
    if not len(candidates):
        return []
    _, inverse, counts = np.unique(keys[candidates], return_inverse=True, return_counts=True)
    repeated = counts[inverse] > 1
    members, groups = candidates[repeated], inverse[repeated]
    order = np.argsort(groups, kind="stable")
    members, groups = members[order], groups[order]
    return np.split(members, np.flatnonzero(np.diff(groups)) + 1) if len(members) else []


def _label_counts_png(plt, counts: dict, path: Path) -> None:
    labelled = {k: v for k, v in counts.items() if v is not None}
    fig, ax = plt.subplots(figsize=(7, 3.5))
    width = 0.8 / max(len(labelled), 1)
    for k, (split, values) in enumerate(labelled.items()):
        ax.bar(np.arange(N_CLASSES) + k * width, values, width, label=f"{split} ({sum(values):,})")
    ax.set_xticks(np.arange(N_CLASSES) + width * (len(labelled) - 1) / 2, [str(d) for d in range(N_CLASSES)])
    ax.set_xlabel("digit")
    ax.set_ylabel("rows")
    ax.set_title("Label counts per split")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=max(len(labelled), 1), frameon=False)  # below
    _save(plt, fig, path)  # the axes, never over a bar


def _class_means_png(plt, sums: np.ndarray, counts: np.ndarray, labelled: bool, path: Path) -> None:
    fig, axes = plt.subplots(2, 5, figsize=(7.5, 3.9))
    for digit, ax in enumerate(axes.ravel()):
        n = int(counts[digit]) if labelled else 0
        mean = sums[digit] / n if n else np.zeros(sums.shape[1:])
        ax.imshow(mean, cmap="gray", vmin=0, vmax=PIXEL_MAX)
        ax.set_title(f"{digit} (n={n:,})", fontsize=9)
        ax.axis("off")
    fig.suptitle("Mean training image per class")
    _save(plt, fig, path)


def _histogram_png(plt, histogram: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for split, values in histogram.items():
        total = max(sum(values), 1)
        ax.plot(np.arange(PIXEL_MAX + 1), np.asarray(values) / total, label=split)
    ax.set_yscale("log")
    ax.set_xlabel("pixel intensity (0 background .. 255 ink)")
    ax.set_ylabel("fraction of pixels")
    ax.set_title("Pixel-intensity histogram")
    ax.legend()
    _save(plt, fig, path)


def _save(plt, fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _dump(path: Path, payload) -> None:
    path.write_text(json.dumps(payload, indent=1) + "\n")
