"""The command line as a new user meets it: mistakes are one line and exit 2 before anything starts (no Prefect,
no TensorFlow, no run folder), with "did you mean" where it applies; `--version`; help that reads as sentences;
every command the README shows is a real command."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

import datagen

ROOT = Path(__file__).resolve().parents[1]
# what the CLI may import before it says a mistake: none of the heavy systems a run starts
CHECK = ("import sys, runpy\nsys.argv = ['digits', *sys.argv[1:]]\n"
         "try:\n    from flows.cli import main\n    main()\nfinally:\n"
         "    print('IMPORTED', sorted(m for m in ('tensorflow', 'prefect', 'mlflow', 'apache_beam', 'great_expectations')"
         " if m in sys.modules), file=sys.stderr)\n")


def _mistake(home: Path, *args: str) -> tuple[int, str, float, list[str]]:
    """(exit code, the stderr lines but the import note, seconds, the heavy modules imported) of a digits command
    run as its own process."""
    env = {**os.environ, "DIGITS_HOME": str(home)}
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", CHECK, *args], env=env, capture_output=True, text=True, timeout=120,
                          cwd=ROOT)
    seconds = time.perf_counter() - started
    lines = done.stderr.strip().splitlines()
    imported = eval(lines[-1].removeprefix("IMPORTED "))  # the list printed above
    return done.returncode, "\n".join(lines[:-1]), seconds, imported


@pytest.mark.parametrize("pipeline, data, words", [
    ("train-kaggle", "empty", "train.csv"),
    ("train-mnist", "empty", "idx"),
    ("train-noisy", "empty", "mnist_background_random"),
    ("train-folder", "empty", "train/"),
    ("train-kaggle", "missing", "no such"),
    ("train-folder", "a-file", "folder"),
])
def test_a_wrong_data_path_is_one_line_and_no_run(cli, home, tmp_path, pipeline, data, words):
    (tmp_path / "empty").mkdir()
    (tmp_path / "a-file").write_text("not a folder")
    result = cli("run", pipeline, "--data", tmp_path / data)
    assert result.code == 2 and len(result.err.strip().splitlines()) == 1, result.err
    assert result.err.startswith("digits: error: ") and words.lower() in result.err.lower(), result.err
    assert not (home / "runs").exists()


@pytest.mark.parametrize("args, words", [
    (["--set", "train.epoch=3"], "did you mean train.epochs?"),
    (["--set", "ingest.limt=500"], "did you mean ingest.limit?"),
    (["--set", "epochs=3"], "did you mean train.epochs, tune.epochs or review.epochs?"),
    (["--set", "trainn.width=0.5"], "did you mean train.width?"),
    (["--preset", "bets"], "unknown preset 'bets'; did you mean best?"),
    (["--set", "train.epochs=many"], "invalid value for 'train.epochs'"),
])
def test_a_mistyped_setting_or_preset_says_what_was_meant(cli, home, tmp_path, args, words):
    datagen.write_kaggle(tmp_path / "kaggle", n_train=20, n_test=5)
    result = cli("run", "train-kaggle", "--data", tmp_path / "kaggle", *args)
    assert result.code == 2 and len(result.err.strip().splitlines()) == 1 and words in result.err, result.err
    assert not (home / "runs").exists()


@pytest.mark.parametrize("mistake", ["data", "setting"])
def test_a_mistake_is_said_before_prefect_or_tensorflow_start(tmp_path, mistake):
    """As its own process, the way a user meets it: nothing heavy imported, no run folder, in seconds."""
    home = tmp_path / "home"
    (tmp_path / "empty").mkdir()
    datagen.write_kaggle(tmp_path / "kaggle", n_train=20, n_test=5)
    args = (["--data", str(tmp_path / "empty")] if mistake == "data"
            else ["--data", str(tmp_path / "kaggle"), "--set", "train.epoch=3"])
    code, err, seconds, imported = _mistake(home, "run", "train-kaggle", *args)
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("digits: error: "), err
    assert imported == [] and not (home / "runs").exists(), (imported, err)
    assert seconds < 10  # no Prefect start-up, no TensorFlow import (the measured time: docs/benchmarks.md)


def test_version_and_help_that_reads_as_sentences(cli):
    from importlib.metadata import version

    result = cli("--version")
    assert result.code == 0 and result.out.strip() == f"digits {version('digits')}"
    for command in (["resume"], ["tune"], ["registry", "promote"], ["app"]):
        shown = cli(*command, "--help")
        assert shown.code == 0, shown.err
        usage, _, rest = shown.out.partition("Usage:")
        description = rest.split("╭")[0].splitlines()[2:]  # the lines between the usage line and the option box
        text = " ".join(line.strip() for line in description if line.strip())
        assert text and all(len(line.strip()) > 50 or line.strip().endswith((".", ":", ")")) or not line.strip()
                            for line in description), (command, description)  # sentences, not broken lines
    assert "Off unless tune.trials > 0" in " ".join(cli("tune", "--help").out.split())


def _readme_commands() -> list[list[str]]:
    """Every `digits ...` command the README shows in its code blocks, as the words up to its first option or
    argument that is not a subcommand."""
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```(?:bash|sh|console)?\n(.*?)```", text, flags=re.S)
    found = set()
    for block in blocks:
        for line in block.splitlines():
            for match in re.finditer(r"(?:^|\s|/)digits((?:\s+[a-z][a-z-]*)+)", line.split("#")[0]):
                words = match.group(1).split()
                found.add(tuple(words[:2]))
    return [list(words) for words in sorted(found)]


def test_every_command_the_readme_shows_is_a_real_command(cli):
    from flows.cli import build_app

    commands = _readme_commands()
    assert len(commands) >= 10, commands
    app = build_app()
    import typer.main

    click_app = typer.main.get_command(app)
    missing = []
    for words in commands:
        group, known = click_app, []
        for word in words:
            sub = group.get_command(None, word) if hasattr(group, "get_command") else None
            if sub is None:
                break
            group, known = sub, known + [word]
        if not known:
            missing.append(" ".join(words))
            continue
        shown = cli(*known, "--help")
        if shown.code != 0:
            missing.append(" ".join(known) + f" (--help exits {shown.code})")
    assert not missing, f"README commands that are not commands: {missing}"


def test_a_local_api_that_does_not_start_in_time_is_one_line(tmp_path):
    """Prefect's local API slow to start (a busy machine) is said in one line with what to set — no traceback."""
    datagen.write_kaggle(tmp_path / "kaggle", n_train=20, n_test=5)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update(DIGITS_HOME=str(tmp_path / "home"), PREFECT_HOME=str(tmp_path / "prefect"),
               PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="0")
    ran = subprocess.run([sys.executable, "-m", "flows.cli", "run", "train-kaggle", "--data", str(tmp_path / "kaggle")],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert ran.returncode == 1 and "Traceback" not in ran.stderr, ran.stderr
    (line,) = [line for line in ran.stderr.splitlines() if line.strip()]
    assert line.startswith("digits: error: Prefect's local API server did not answer within 0 s") and \
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS" in line, line
