"""Presets: named sets of config overrides, so a user need not know the numbers (`digits run PIPELINE
--preset NAME`; `--set` after it still overrides single fields). Each is measured in the README.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Preset:
    name: str
    help: str
    overrides: tuple[str, ...]


_ROBUST = ("train.background_noise=1", "train.pixel_noise=0.3", "train.contrast=0.2", "train.brightness=0.1",
           "train.epochs=12")

PRESETS: tuple[Preset, ...] = (
    Preset("fast", "a minute of training: digits-net at half width, no augmentation, 3 epochs",
           ("train.model=digits-net", "train.width=0.5", "train.augment=false", "train.epochs=3")),
    Preset("default", "the embedded defaults (what a run without --preset trains)", ()),
    Preset("best", "the most accurate model within an hour on 2 CPU cores: an ensemble of 3 digits-net members, "
                   "each trained 17 epochs with elastic distortion, then 1 epoch on the undistorted images "
                   "(train.workers or dask.address spread them over processes or machines)",
           ("train.model=digits-net", "train.members=3", "train.epochs=17", "train.elastic=36",
            "train.elastic_sigma=6", "train.clean_epochs=1")),
    Preset("robust", "noise-robust training: random backgrounds, pixel noise, contrast and brightness jitter on "
                     "top of the usual rotation/shift/zoom (a base for noisy scans)",
           _ROBUST),
    Preset("robust-best", "the base for the most accurate noisy-digit model: the robust preset's training, an "
                          "ensemble of 3 members of two architectures, digits-net, bn-cnn and digits-net "
                          "(train-noisy then fine-tunes each member)",
           ("train.model=digits-net", *_ROBUST, "train.members=3", "train.member_models=digits-net,bn-cnn,digits-net")),
)

_BY_NAME = {preset.name: preset for preset in PRESETS}


def preset(name: str) -> Preset:
    from schemas.errors import ConfigError

    try:
        return _BY_NAME[name]
    except KeyError:
        import difflib

        close = difflib.get_close_matches(name, list(_BY_NAME), n=1, cutoff=0.5)
        hint = f"did you mean {close[0]}? " if close else ""
        raise ConfigError(f"unknown preset '{name}'; {hint}known: {', '.join(_BY_NAME)}") from None
