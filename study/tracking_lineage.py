"""What the MLflow UI shows about where a run came from: the experiment's kind, each run's source (entry point and
git commit) and the prepared data split it read, as an MLflow dataset input.

- **Experiment kind**: MLflow 3's UI opens an experiment by its ``mlflow.experimentKind`` tag; without it the UI
  guesses, and for an experiment without models or traces it guesses the GenAI overview. The study's experiment
  is declared ``custom_model_development`` (the UI's "machine learning" kind, whose landing page is the runs
  table).
- **Source**: MLflow's own source tags (``mlflow.source.name``, ``mlflow.source.type``,
  ``mlflow.source.git.commit``, ``mlflow.source.git.branch``), which the runs table's Source column and a run's
  page read. The runs are created through ``MlflowClient``, which (unlike ``mlflow.start_run``) sets none of them.
  The commit is the working directory's (``HEAD``), found with MLflow's own git helper; a directory outside git
  (a Ray job's uploaded working directory) gets no commit tag.
- **Dataset inputs**: a prepared split (``<dataset_dir>/<split>.npy`` with its manifest) as an
  ``mlflow.entities.Dataset``: name ``<dataset>-<split>``, digest the first 16 hex digits of the split's sha256
  from the manifest (MLflow stores at most 36 characters; the full sha256 is in the profile), source the array's
  path, schema its shape and dtype. Trials log their train and validation splits (contexts ``training`` and
  ``validation``), the evaluate stage its test split (``evaluation``); the runs table's Dataset column shows them.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Any

from mlflow.entities import Dataset, DatasetInput, InputTag
from mlflow.tracking import MlflowClient

EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
#: The kind MLflow 3's UI calls "machine learning" (runs table first); the other is ``genai_development``.
MODEL_TRAINING_KIND = "custom_model_development"
DATASET_CONTEXT_TAG = "mlflow.data.context"
DIGEST_LENGTH = 16


def declare_model_training(client: MlflowClient, experiment_id: str) -> None:
    """Tag the experiment ``mlflow.experimentKind = custom_model_development`` unless it already has a kind
    (one chosen in the UI is kept)."""
    experiment = client.get_experiment(experiment_id)
    if EXPERIMENT_KIND_TAG not in experiment.tags:
        client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND)


@functools.cache
def _git(directory: str) -> tuple[str | None, str | None]:
    from mlflow.utils.git_utils import get_git_branch, get_git_commit

    return get_git_commit(directory), get_git_branch(directory)


def entry_point() -> str:
    """The running program as ``python -m`` names it (``pipelines.sweep``), else its script's file name."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return spec.name if spec is not None and spec.name else Path(sys.argv[0] or "python").name


def source_tags(entry_point: str, directory: str | Path | None = None) -> dict[str, str]:
    """MLflow's source tags for a run started by ``entry_point`` (e.g. ``pipelines.sweep``) in ``directory``
    (default: the working directory): name, type ``LOCAL`` and, inside a git checkout, commit and branch."""
    commit, branch = _git(str(Path(directory or Path.cwd()).resolve()))
    tags = {"mlflow.source.name": entry_point, "mlflow.source.type": "LOCAL"}
    if commit:
        tags["mlflow.source.git.commit"] = commit
    if branch:
        tags["mlflow.source.git.branch"] = branch
    return tags


def split_dataset(data_dir: str | Path, split: str, manifest: dict[str, Any] | None = None) -> Dataset:
    """The prepared split ``split`` of ``data_dir`` as an MLflow dataset (see the module docstring).

    Args:
        data_dir: a prepared directory (``manifest.json`` + ``<split>.npy``).
        split: e.g. ``train``.
        manifest: that directory's manifest, when the caller has read it already.

    Raises:
        FileNotFoundError: no manifest in ``data_dir``.
        KeyError: the manifest has no such split.
    """
    from study.data.store import read_manifest

    data_dir = Path(data_dir)
    manifest = manifest if manifest is not None else read_manifest(data_dir)
    entry = manifest["splits"][split]
    path = (data_dir / entry["file"]).resolve()
    schema = {"type": "ndarray", "shape": list(entry.get("shape", [])), "dtype": entry.get("dtype", "uint8")}
    profile = {"num_images": entry.get("count", (entry.get("shape") or [None])[0]), "sha256": entry["sha256"]}
    return Dataset(name=f"{data_dir.name}-{split}", digest=entry["sha256"][:DIGEST_LENGTH], source_type="local",
                   source=json.dumps({"uri": path.as_uri()}), schema=json.dumps(schema), profile=json.dumps(profile))


def log_splits(client: MlflowClient, run_id: str, data_dir: str | Path, contexts: dict[str, str]) -> None:
    """Log the prepared splits of ``data_dir`` as dataset inputs of run ``run_id``: ``contexts`` maps a split
    (``train``) to its context (``training``). A split the manifest lacks is left out."""
    from study.data.store import MANIFEST, read_manifest

    if not (Path(data_dir) / MANIFEST).is_file():
        return  # data only the workers see (a cluster without shared storage): its sha256 is in data_sha256
    manifest = read_manifest(data_dir)  # once: every trial start passes here
    inputs = [DatasetInput(split_dataset(data_dir, split, manifest), tags=[InputTag(DATASET_CONTEXT_TAG, context)])
              for split, context in contexts.items() if split in manifest["splits"]]
    if inputs:
        client.log_inputs(run_id, datasets=inputs)


def dataset_inputs(run: Any) -> dict[str, dict[str, str]]:
    """A fetched run's (``MlflowClient.get_run``) dataset inputs as ``context -> {name, digest, source}``."""
    found = {}
    for item in run.inputs.dataset_inputs:
        context = next((t.value for t in item.tags if t.key == DATASET_CONTEXT_TAG), "")
        found[context] = {"name": item.dataset.name, "digest": item.dataset.digest, "source": item.dataset.source}
    return found
