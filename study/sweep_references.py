"""One arm of a sweep built on another arm's selected model: ``model.frozen_mean_checkpoint: "arm:<name>"``.

The frozen-mean control (``study.models.frozen_mean``) learns a structured precision on the mean of the Gaussian
arm's selected trial. Arms run one after another (``study.sweep.run_sweep``), so when the control's turn comes the
referenced arm has finished: its selected trial (:func:`study.selection.select_best`, the rule the report uses)
is downloaded from MLflow into ``<storage>/<sweep>.references/<arm>/`` and the override becomes that directory,
which the sweep summary then records as the arm's override (the replicate stage reuses it as it is).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from study.selection import select_best

PREFIX = "arm:"
REFERENCE_KEYS = ("model.frozen_mean_checkpoint",)


def referenced_arms(overrides: dict[str, Any]) -> list[str]:
    """The arm names ``overrides`` refers to through ``arm:<name>`` values of :data:`REFERENCE_KEYS`."""
    return [v[len(PREFIX):] for k, v in overrides.items()
            if k in REFERENCE_KEYS and isinstance(v, str) and v.startswith(PREFIX)]


def check_references(arm_order: list[str], overrides_of: dict[str, dict[str, Any]]) -> None:
    """Every ``arm:<name>`` names an arm listed before the one that uses it.

    Raises:
        ValueError: an unknown arm, or one that runs later (or is the arm itself).
    """
    for position, arm in enumerate(arm_order):
        for name in referenced_arms(overrides_of[arm]):
            if name not in arm_order:
                raise ValueError(f"sweep arm {arm!r} refers to arm {name!r}, which the sweep does not have "
                                 f"(arms: {arm_order})")
            if arm_order.index(name) >= position:
                raise ValueError(f"sweep arm {arm!r} refers to arm {name!r}, which must be listed before it "
                                 "(arms run in the order of sweep.variants)")


def resolve_references(overrides: dict[str, Any], trials: list[dict[str, Any]], client, directory: Path
                       ) -> dict[str, Any]:
    """``overrides`` with each ``arm:<name>`` replaced by the local checkpoint directory of that arm's selected
    trial (downloaded from its MLflow run's ``checkpoint/`` artifact into ``directory / <name>``).

    ``trials``: the sweep's trial records so far (``study.sweep._collect``).

    Raises:
        RuntimeError: the referenced arm has no finished trial to build on.
    """
    resolved = dict(overrides)
    for key, value in overrides.items():
        if key not in REFERENCE_KEYS or not (isinstance(value, str) and value.startswith(PREFIX)):
            continue
        name = value[len(PREFIX):]
        group = [t for t in trials if t["variant"] == name]
        chosen = select_best(group, group[0]["metric"], group[0]["mode"], within_arm=True) if group else None
        if chosen is None:
            raise RuntimeError(f"{key}: arm {name!r} has no finished trial to build on")
        target = Path(directory) / name
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            downloaded = Path(client.download_artifacts(chosen["run_id"], "checkpoint", tmp))
            shutil.rmtree(target, ignore_errors=True)
            shutil.move(str(downloaded), target)
        (target / "SOURCE").write_text(f"arm {name}, trial {chosen['trial_id']}, MLflow run {chosen['run_id']}\n")
        resolved[key] = str(target)
    return resolved
