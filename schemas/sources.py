"""Every source the pipeline reads, one row each: the single place a source's facts live.

A row names the source's reader (a `module:function` in components/ingest, imported only when a run
reads that source), what `--data` is, the published size of each split (the validation suites' default
row counts), the evaluation gate's threshold, the pipeline's config defaults, the overrides its
validation suites apply to the templates in schemas/suites/, and the help text of the CLI. The
`Source` and `Pipeline` enums, the config defaults, the suites, `digits --help` and the deployments'
test derive from this table: a new source is a reader, a row here, a deployment and docs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Mapping

CHAMPION_OF_MNIST = "models:/digits-mnist@champion"


@dataclass(frozen=True)
class SourceSpec:
    name: str
    title: str
    reader: str  # "module:function" with the signature of components.ingest.splits.Reader
    layout: str  # "module:function" (data: Path) -> the input files read, checked without reading them
    data_help: str  # what --data names
    published_rows: Mapping[str, int] = field(default_factory=dict)  # rows per split of the published set
    threshold: float = 0.99  # the gate's default validation accuracy
    defaults: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # config sections it sets differently
    needs_data: bool = True  # False: without --data the reader downloads (TFDS)
    streams: bool = False  # the reader yields its splits in pieces: memory does not grow with the input's size
    background_noise: bool = False  # ink is found under a noise background (a 3x3 mean), see validate.features
    suite_overrides: Mapping[str, Mapping[str, Any] | None] = field(default_factory=dict)
    """Per expectation id of the suite templates: None drops it; a mapping replaces `type` and/or
    updates `kwargs` and `meta` (see schemas.suites)."""

    @property
    def pipeline(self) -> str:
        return f"train-{self.name}"

    @property
    def registry_model(self) -> str:
        return f"digits-{self.name}"


# Fine-tuning the clean-MNIST champion: no rotation/shift/zoom on noise backgrounds (their black fill
# would be a give-away never seen at test time), more epochs on the small sets.
_FINE_TUNE = {"transfer": {"base": CHAMPION_OF_MNIST}, "train": {"augment": False, "epochs": 20}}
# The noisy set also gets the robustness augmentations that keep a noise background noise: the noise itself
# re-drawn under the darkest background pixels, pixel noise, contrast and brightness jitter. Chosen on noisy val
# (README, Transfer learning: 99.33 % against 98.83 % without them; noisy test 98.63 % against 98.50 %).
# And it rehearses every image the base was trained on, drawn on a noise background: 54,000 more noisy digits
# beside its own 10,799, so 8 epochs instead of 20 (README: noisy test 98.7 % -> 99.1 %).
_NOISY_FINE_TUNE = {"transfer": {**_FINE_TUNE["transfer"], "rehearse": 1.0},
                    "train": {**_FINE_TUNE["train"], "epochs": 8, "background_noise": 1.0, "pixel_noise": 0.1,
                              "contrast": 0.1}}

SOURCES: tuple[SourceSpec, ...] = (
    SourceSpec(
        name="kaggle", title="Kaggle Digit Recognizer", reader="components.ingest.kaggle:read",
        layout="components.ingest.kaggle:layout", streams=True,
        data_help="a folder with train.csv + test.csv, or the competition zip",
        published_rows={"train": 42_000, "test": 28_000}, threshold=0.99),
    SourceSpec(
        name="mnist", title="TFDS mnist", reader="components.ingest.mnist:read",
        layout="components.ingest.mnist:layout", streams=True,
        data_help="a folder with the 4 original idx .gz files, or a TFDS data_dir; omit to let TFDS download",
        published_rows={"train": 60_000, "test": 10_000}, threshold=0.99, needs_data=False),
    SourceSpec(
        name="noisy", title="noisy MNIST (random backgrounds)", reader="components.ingest.noisy:read",
        layout="components.ingest.noisy:layout", streams=True,
        data_help="a folder with mnist_background_random_{train,test}.amat, or train.csv + test.csv",
        published_rows={"train": 12_000, "test": 50_000}, threshold=0.97, defaults=_NOISY_FINE_TUNE,
        background_noise=True,
        suite_overrides={
            "ink": {"type": "expect_column_median_to_be_between",
                    "kwargs": {"min_value": 15, "max_value": 120, "mostly": None},
                    "meta": {"intent": "ink under noise: median digit mask 32 pixels upright, 0 inverted"}},
            "border": None,  # the noise background is on the border too
            "size": None,  # the noisy mask's extent is not the digit's
            "orientation": {"kwargs": {"mostly": 0.65},
                            "meta": {"intent": "orientation: upright digits are taller than wide (83% upright, "
                                               "27% if left transposed)"}},
        }),
    SourceSpec(
        name="folder", title="your own images", reader="components.ingest.folder:read",
        layout="components.ingest.folder:layout", streams=True,
        data_help="a folder with train/<digit>/*.png|jpg|jpeg (+ optional unlabelled test/*.png|jpg|jpeg)",
        threshold=0.9, defaults=_FINE_TUNE,
        suite_overrides={
            "balance": {"kwargs": {"threshold": 0.1},
                        "meta": {"intent": "class balance: KL(observed || uniform) < 0.1 (a person's own "
                                           "collection is rarely exactly balanced)"}},
        }),
)

_BY_NAME = {spec.name: spec for spec in SOURCES}


class _SourceBase(StrEnum):
    @property
    def spec(self) -> SourceSpec:
        return _BY_NAME[self.value]


Source = _SourceBase("Source", {spec.name: spec.name for spec in SOURCES})
"""The sources, as named on the command line (`--source`): one member per row of SOURCES."""


def source_spec(name: str) -> SourceSpec:
    """The row of a source by name. Raises KeyError for an unknown one."""
    return _BY_NAME[str(name)]
