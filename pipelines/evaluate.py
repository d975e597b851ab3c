"""DVC stage ``evaluate``: the best trial of each sweep arm, and every finished seed replicate of it, re-evaluated
on the test split with every metric.

Checkpoints come from MLflow (``checkpoint/`` of each run), so the stage works wherever the sweep ran. Every
evaluated run gets its results back in MLflow: ``test_*`` metrics, ``evaluation/evaluation.json``,
``evaluation/diagnostics.json`` (the reason for each metric that could not be computed, and which implementation
computed each one), a short tag ``unavailable_metrics`` naming those metrics (``none``), and the test split as a
dataset input (context ``evaluation``, see :mod:`study.tracking_lineage`). In
``<evaluate.output_dir>/``: ``<arm>.json`` per arm (the selected trial), ``examples.npz`` (inputs,
reconstructions and samples per arm, for the report's figures), ``per_image.npz`` (per-test-image values keyed
``<arm>/<run_id>/<metric>``, e.g. ``nll`` in nats and ``mse_255``, of the selected trial and of every evaluated
replicate, for paired tests) and ``summary.json``.

Replicates: when the ``replicate`` stage's file (``replicate.output``) exists and ``replicate.num_seeds`` > 0,
every replicate run with status FINISHED is evaluated with the same settings and the same evaluator seed as the
selected trials, and ``summary.json`` gets ``"replicates": {<arm>: [{seed, run_id, trial_id, metrics,
unavailable}, ...]}`` plus ``"replicates_skipped"`` (the FAILED ones, with their error). Without that file (or
with ``num_seeds: 0``) the stage evaluates the selected trials only.
"""

from __future__ import annotations

import io
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from pipelines.common import stage_arguments, sweep_summary

DIAGNOSTICS_ARTIFACT = "evaluation/diagnostics.json"


def replicates_file(params: Any) -> Path | None:
    """The replicate stage's output when replicates are configured and written, else None (selected trials only).

    Read defensively: a params file without a ``replicate`` section, ``num_seeds: 0`` or a missing file all mean
    "no replicates".
    """
    section = getattr(params, "replicate", None)
    if section is None or int(getattr(section, "num_seeds", 0) or 0) <= 0:
        return None
    path = Path(getattr(section, "output", "results/replicates.json"))
    return path if path.is_file() else None


def load_replicates(path: Path, parent_run_id: str) -> dict[str, list[dict[str, Any]]]:
    """Arm -> its replicate records (``arms.<arm>.replicates`` of ``results/replicates.json``).

    Raises:
        ValueError: the file belongs to another sweep (its ``parent_run_id`` differs from the sweep summary's), or
            an arm name contains ``/`` (the separator of ``per_image.npz`` keys).
    """
    data = json.loads(path.read_text())
    if data.get("parent_run_id") != parent_run_id:
        raise ValueError(f"{path} was written for sweep run {data.get('parent_run_id')!r}, but the sweep summary is "
                         f"run {parent_run_id!r}: re-run the replicate stage (`uv run dvc repro replicate`)")
    arms = {}
    for arm, record in (data.get("arms") or {}).items():
        if "/" in arm:
            raise ValueError(f"arm name {arm!r} contains '/', which per_image.npz keys use as separator")
        arms[arm] = list(record.get("replicates") or [])
    return arms


def main(argv: list[str] | None = None) -> int:
    _, params = stage_arguments(argv, __doc__)

    import numpy as np
    import torch
    from mlflow.entities import Metric, RunTag
    from tqdm import tqdm

    from study.atomic import atomic_directory
    from study.data.loader import DeviceSplit
    from study.evaluate import evaluate_model
    from study.evaluate_examples import example_images
    from study.tracking import connect
    from study.tracking_lineage import log_splits
    from study.train import load_checkpoint, select_device

    cfg = params.evaluate
    summary = sweep_summary(params)
    if summary is None:
        return 1
    replicate_path = replicates_file(params)
    try:
        replicates = load_replicates(replicate_path, summary["parent_run_id"]) if replicate_path else None
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    client, _ = connect(params.tracking)
    device = select_device(cfg.device)
    data = DeviceSplit(params.dataset_dir(), cfg.split, device)
    index = torch.arange(len(data), device=device)
    images = data.take(index)  # (N, C, H, W) in [0, 1]
    # YCbCr: pixel metrics against the RGB before the conversion (Dorta et al. 2018), when prepare kept it.
    reference = data.take_pixel_reference(index) if data.rgb_reference is not None else None
    out_dir = Path(cfg.output_dir)
    per_image: dict[str, np.ndarray] = {}

    def evaluate_run(arm: str, run_id: str, trial_id: str, examples: dict[str, np.ndarray] | None):
        """Evaluate one run's checkpoint, log the result to that run, keep its per-image arrays."""
        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = Path(client.download_artifacts(run_id, "checkpoint", tmp))
            config, model, state = load_checkpoint(checkpoint, device)
            result = evaluate_model(
                model, images, num_importance_samples=cfg.num_importance_samples, batch_size=cfg.batch_size,
                seed=cfg.seed, color=data.color, lpips_weights=cfg.lpips_weights,
                inception_weights=cfg.inception_weights, num_fid_samples=cfg.num_fid_samples, device=device,
                num_recon_passes=cfg.num_recon_passes, iwae_batch_size=cfg.iwae_batch_size, prefix=cfg.split,
                pixel_reference=reference,
            )
            if examples is not None:
                for name, array in example_images(model, images, cfg.num_examples, cfg.seed, data.color).items():
                    examples[f"{arm}/{name}"] = array
        result.settings.update(arm=arm, run_id=run_id, trial_id=trial_id, family=config.family,
                               epoch=int(state.get("epoch", -1)), split=cfg.split)
        now = int(time.time() * 1000)
        # Short tags the runs table can show; the reasons and implementations are a readable artifact.
        client.log_batch(
            run_id,
            metrics=[Metric(k, float(v), now, 0) for k, v in result.metrics.items() if np.isfinite(v)],
            tags=[RunTag("unavailable_metrics", ", ".join(sorted(result.unavailable)) or "none")],
        )
        client.log_text(run_id, result.to_json(), "evaluation/evaluation.json")
        client.log_dict(run_id, {"unavailable": result.unavailable, "implementations": result.implementations},
                        DIAGNOSTICS_ARTIFACT)
        log_splits(client, run_id, params.dataset_dir(), {cfg.split: "evaluation"})
        for name, values in result.per_image_arrays().items():
            per_image[f"{arm}/{run_id}/{name}"] = values
        shown = {k: round(v, 3) for k, v in result.metrics.items() if k.endswith(("_mse_255", "_nll", "_ssim", "_sharpness_ratio"))}
        tqdm.write(f"evaluated {arm} (run {run_id}) on {len(data)} {cfg.split} images in "
                   f"{time.perf_counter() - started:.1f} s: {shown}; unavailable: {sorted(result.unavailable)}")
        return config, result

    evaluated, examples, arm_files = {}, {}, {}
    # One bar over the arms (stderr); the per-arm lines print above it.
    for arm, trial in tqdm(summary["best_per_variant"].items(), desc="evaluate", unit="arm",
                           total=len(summary["best_per_variant"]), file=sys.stderr, dynamic_ncols=True):
        if "/" in arm:
            print(f"error: arm name {arm!r} contains '/', which per_image.npz keys use as separator", file=sys.stderr)
            return 1
        config, result = evaluate_run(arm, trial["run_id"], trial["trial_id"], examples)
        arm_files[f"{arm}.json"] = result.to_json()
        evaluated[arm] = {
            "run_id": trial["run_id"], "trial_id": trial["trial_id"], "family": config.family,
            "elbo_valid": bool(result.settings.get("elbo_valid", False)), "metrics": result.metrics,
            "unavailable": result.unavailable, "implementations": result.implementations,
        }
    extra: dict[str, Any] = {}
    if replicates is not None:
        # Each replicate re-trains the arm's selected configuration with a fresh seed; only finished ones have a
        # checkpoint worth scoring, the failed ones are listed so a report can say how many seeds are missing.
        done: dict[str, list[dict[str, Any]]] = {}
        skipped: dict[str, list[dict[str, Any]]] = {}
        for arm, records in replicates.items():
            done[arm], skipped[arm] = [], []
            for rep in records:
                if rep.get("status") != "FINISHED":
                    skipped[arm].append({"seed": rep.get("seed"), "run_id": rep.get("run_id"),
                                         "status": rep.get("status"), "error": rep.get("error")})
                    continue
                _, result = evaluate_run(arm, rep["run_id"], str(rep.get("trial_id")), None)
                done[arm].append({"seed": int(rep["seed"]), "run_id": rep["run_id"], "trial_id": rep.get("trial_id"),
                                  "epochs": rep.get("epochs"),
                                  "elbo_valid": bool(result.settings.get("elbo_valid", False)),
                                  "metrics": result.metrics,
                                  "unavailable": result.unavailable})
        extra = {"replicates": done, "replicates_skipped": skipped}
    # Every arm's selected trial (and each finished replicate) as an MLflow model, models:/<experiment>-<arm>@champion
    # (replicates @seed-<n>): mlflow.pytorch.load_model gives a module with reconstruct(x) and sample(n).
    from study.model_registry import register_models
    from study.tracking import tracking_uri

    try:
        registered = register_models(client, tracking_uri(params.tracking), params.tracking.experiment,
                                     summary["best_per_variant"], images[:1].cpu(), replicates)
    except Exception as err:  # noqa: BLE001 - the registry is an extra: never lose the evaluation over it
        print(f"warning: models not registered in the MLflow model registry ({type(err).__name__}: "
              f"{str(err).strip().splitlines()[-1] if str(err).strip() else ''}); the evaluation is kept",
              file=sys.stderr)
        registered = {}
    for record in registered.values():
        seeds = ", ".join(f"@{r['alias']}" for r in record["replicates"])
        print(f"registered {record['uri']} (version {record['version']}, run {record['run_id']})"
              + (f"; replicates {seeds}" if seeds else ""))
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **examples)
    per_image_buffer = io.BytesIO()
    np.savez_compressed(per_image_buffer, **per_image)
    # The whole output directory is replaced at once (DVC keeps it in place, `persist`): a failed run leaves the
    # previous evaluation, and no file of an older sweep's arms survives a new one.
    with atomic_directory(out_dir) as tmp:
        for name, text in arm_files.items():
            (tmp / name).write_text(text)
        (tmp / "examples.npz").write_bytes(buffer.getvalue())
        (tmp / "per_image.npz").write_bytes(per_image_buffer.getvalue())
        (tmp / "summary.json").write_text(json.dumps(
            {"split": cfg.split, "num_images": len(data), "color": data.color, "arms": evaluated, **extra,
             "settings": cfg.model_dump(mode="json")}, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
