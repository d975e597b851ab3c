"""What every stage entry point does first: parse ``--params`` and validate the file, or exit with code 2."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from study.config import ConfigError, StudyParams, load_params


def stage_arguments(
    argv: list[str] | None, description: str | None, configure: Callable[[argparse.ArgumentParser], None] | None = None
) -> tuple[argparse.Namespace, StudyParams]:
    """Parse the stage's command line and load its validated params file.

    Raises:
        SystemExit(2): the params file is missing or invalid (the message, naming the field, goes to stderr).
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--params", default="params.yaml", help="study parameters (default: params.yaml)")
    if configure is not None:
        configure(parser)
    args = parser.parse_args(argv)
    try:
        return args, load_params(args.params)
    except (ConfigError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def sweep_summary(params: StudyParams) -> dict | None:
    """The sweep stage's summary (``sweep.output``, JSON), or None after printing to stderr that it is missing."""
    path = Path(params.sweep.output)
    if not path.is_file():
        print(f"error: {path} not found: run the sweep first (`uv run dvc repro sweep`)", file=sys.stderr)
        return None
    return json.loads(path.read_text())
