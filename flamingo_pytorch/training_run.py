"""The run folder of a training entry point (``examples/train.py``): its JSON config, its checkpoints, its log.

``parse_with_config`` reads flags from a JSON file and the command line (flags win) through the
parser itself, so that a config value meets the same checks as a flag (choices, types), and refuses
a file that is not JSON, not an object, or holds a key that is no flag. ``find_checkpoint`` picks
the latest complete checkpoint of a run and lists the saves that did not finish. ``TrainingLog``
appends one record per step to ``log.jsonl`` and ``log.csv`` (and tensorboard / wandb when asked)
and, on resume, cuts them back to the checkpoint's step so that no step appears twice.
"""

from __future__ import annotations

import argparse
import csv
import json
from difflib import get_close_matches
from pathlib import Path
from typing import Any

from flamingo_pytorch.training_state import complete_checkpoint


def json_object(text: str) -> dict[str, Any]:
    """An argparse ``type``: a JSON object, or an error naming the line and column."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(
            f"invalid JSON at line {error.lineno}, column {error.colno}: {error.msg}"
        ) from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object {{...}}, got {json_type(value)}")
    return value


def json_type(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


def parse_with_config(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """Parse ``argv`` over the JSON object in ``--config`` (its keys are the flags, ``-`` written ``_``).

    Each config value is handed to the parser as its flag would be, before the command line's own
    flags (which therefore win): a value outside a flag's choices or of the wrong type gets the
    parser's usual error. Errors name the file, and the line of a JSON syntax error.
    """
    known, _ = parser.parse_known_args(argv)
    if known.config is None:
        return parser.parse_args(argv)
    return parser.parse_args([*config_flags(parser, known.config, vars(known)), *(argv or [])])


def config_flags(parser: argparse.ArgumentParser, path: Path, defaults: dict[str, Any]) -> list[str]:
    """The config file as command-line flags (``parser.error`` on a file that cannot be one)."""
    try:
        config = json.loads(Path(path).read_text())
    except OSError as error:
        parser.error(f"--config {path}: {error.strerror}")
    except json.JSONDecodeError as error:
        parser.error(f"--config {path}: invalid JSON at line {error.lineno}, column {error.colno}: {error.msg}")
    if not isinstance(config, dict):
        parser.error(
            f'--config {path} must hold a JSON object of flags ({{"steps": 100, ...}}), not {json_type(config)}'
        )
    unknown = [key for key in config if key not in defaults or key == "config"]
    if unknown:
        hints = [
            key + "".join(f" (did you mean {close}?)" for close in get_close_matches(key, defaults, 1))
            for key in unknown
        ]
        parser.error(f"--config {path}: unknown keys {', '.join(hints)}")
    flags = []
    for key, value in config.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(defaults[key], bool):  # an on/off flag
            if not isinstance(value, bool):
                parser.error(f"--config {path}: {key} must be true or false, got {json.dumps(value)}")
            flags += [flag] if value else []
        elif value is not None:
            flags += [flag, json.dumps(value) if isinstance(value, (dict, list)) else str(value)]
    return flags


def find_checkpoint(folder: Path) -> tuple[Path | None, list[Path]]:
    """The latest complete checkpoint ``step-N`` under ``folder`` (None: none), and the saves that did
    not finish (``step-N.partial``, or a ``step-N`` without its metadata), to report."""
    complete, incomplete = {}, []
    for path in sorted(folder.glob("step-*")):
        name, _, suffix = path.name.partition(".")
        step = name.removeprefix("step-")
        if not step.isdigit() or suffix not in ("", "partial", "old"):
            continue
        found = complete_checkpoint(folder / name)
        if found is not None:
            complete[int(step)] = folder / name
        elif suffix != "old":
            incomplete.append(path)
    latest = complete[max(complete)] if complete else None
    return latest, incomplete


class TrainingLog:
    """Rank 0's log: ``log.jsonl`` and ``log.csv`` always, tensorboard and wandb when asked (and installed)."""

    def __init__(self, out: Path, *, enabled: bool, tensorboard: bool = False, wandb: str | None = None, config=None):
        self.enabled, self.out, self.writers = enabled, out, []
        if not enabled:
            return
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

            board = SummaryWriter(str(out / "tensorboard"))
            self.writers.append(lambda record: [board.add_scalar(k, v, record["step"]) for k, v in record.items()])
        if wandb:
            import wandb as wandb_package

            run = wandb_package.init(project=wandb, config=config, resume="allow")
            self.writers.append(lambda record: run.log(record, step=record["step"]))

    def keep_until(self, step: int) -> None:
        """Drop the records after ``step`` (those of a run that went on past its last checkpoint)."""
        if not self.enabled:
            return
        jsonl = self.out / "log.jsonl"
        if jsonl.exists():
            lines = [line for line in jsonl.read_text().splitlines() if line.strip()]
            jsonl.write_text("".join(line + "\n" for line in lines if json.loads(line)["step"] <= step))
        table = self.out / "log.csv"
        if table.exists():
            with open(table, newline="") as file:
                rows = list(csv.reader(file))
            with open(table, "w", newline="") as file:
                csv.writer(file).writerows(rows[:1] + [row for row in rows[1:] if int(row[0]) <= step])

    def write(self, record: dict) -> None:
        """Append ``record`` (its first field is ``step``)."""
        if not self.enabled:
            return
        with open(self.out / "log.jsonl", "a") as file:
            file.write(json.dumps(record) + "\n")
        path = self.out / "log.csv"
        new = not path.exists()
        with open(path, "a", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=list(record))
            if new:
                writer.writeheader()
            writer.writerow(record)
        for writer in self.writers:
            writer(record)
