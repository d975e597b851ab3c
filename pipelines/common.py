"""What every stage entry point does first: parse ``--params`` and validate the file, or exit with code 2."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from study.config import ConfigError, StudyParams, absolute_sqlite_url, load_params


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
        return args, shared_stores(load_params(args.params))
    except (ConfigError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def shared_stores(params: StudyParams, root: str | Path | None = None) -> StudyParams:
    """``params`` with its relative MLflow store (a ``sqlite:///`` path in ``tracking.uri``, and
    ``tracking.artifact_root``) and a relative SQLite ``sweep.searcher.storage`` under the repository the
    experiment belongs to, when a stage runs elsewhere.

    ``dvc exp run --queue`` / ``--temp`` / ``dvc queue start`` run each experiment in a temporary copy
    (``.dvc/tmp/exps/...``) that is deleted afterwards, and set ``DVC_ROOT`` to the original repository: every
    experiment's MLflow runs and Optuna studies then land in that repository's stores (one MLflow UI for all of
    them) instead of vanishing with the copy. ``root``: that repository (default ``$DVC_ROOT``); unchanged when
    it is the working directory (``dvc repro``, ``dvc exp run`` in the workspace) or unset.
    """
    import os

    root = root if root is not None else os.environ.get("DVC_ROOT")
    if not root or Path(root).resolve() == Path.cwd().resolve():
        return params
    root = Path(root).resolve()
    tracking = params.tracking.model_copy(update={
        "uri": absolute_sqlite_url(params.tracking.uri, root),
        "artifact_root": params.tracking.artifact_root if params.tracking.artifact_root.is_absolute()
        else root / params.tracking.artifact_root,
    })
    searcher = params.sweep.searcher
    if searcher.storage is not None:
        searcher = searcher.model_copy(update={"storage": absolute_sqlite_url(searcher.storage, root)})
    sweep = params.sweep.model_copy(update={"searcher": searcher})
    return params.model_copy(update={"tracking": tracking, "sweep": sweep})


def sweep_summary(params: StudyParams) -> dict | None:
    """The sweep stage's summary (``sweep.output``, JSON), or None after printing to stderr that it is missing."""
    path = Path(params.sweep.output)
    if not path.is_file():
        print(f"error: {path} not found: run the sweep first (`uv run dvc repro sweep`)", file=sys.stderr)
        return None
    return json.loads(path.read_text())
