"""DVC stage ``evaluate``: the best trial of each sweep arm, re-evaluated on the test split with every metric.

Checkpoints come from MLflow (``checkpoint/`` of each trial's run), so the stage works wherever the sweep ran.
Results go back to that trial's MLflow run (``test_*`` metrics, ``evaluation/evaluation.json``, and a tag
``unavailable.<metric>`` with the reason for each metric that could not be computed) and to
``<evaluate.output_dir>/``: ``<arm>.json`` per arm, ``examples.npz`` (inputs, reconstructions and samples per
arm, for the report's figures) and ``summary.json``.
"""

from __future__ import annotations

import io
import json
import sys
import tempfile
import time
from pathlib import Path

from pipelines.common import stage_arguments, sweep_summary


def main(argv: list[str] | None = None) -> int:
    _, params = stage_arguments(argv, __doc__)

    import numpy as np
    import torch
    from mlflow.entities import Metric, RunTag

    from study.atomic import atomic_directory
    from study.data.loader import DeviceSplit
    from study.evaluate import evaluate_model
    from study.evaluate_examples import example_images
    from study.tracking import connect
    from study.train import load_checkpoint, select_device

    cfg = params.evaluate
    summary = sweep_summary(params)
    if summary is None:
        return 1
    client, _ = connect(params.tracking)
    device = select_device(cfg.device)
    data = DeviceSplit(params.dataset_dir(), cfg.split, device)
    index = torch.arange(len(data), device=device)
    images = data.take(index)  # (N, C, H, W) in [0, 1]
    # YCbCr: pixel metrics against the RGB before the conversion (Dorta et al. 2018), when prepare kept it.
    reference = data.take_pixel_reference(index) if data.rgb_reference is not None else None
    out_dir = Path(cfg.output_dir)
    evaluated, examples, arm_files = {}, {}, {}
    for arm, trial in summary["best_per_variant"].items():
        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = Path(client.download_artifacts(trial["run_id"], "checkpoint", tmp))
            config, model, state = load_checkpoint(checkpoint, device)
            result = evaluate_model(
                model, images, num_importance_samples=cfg.num_importance_samples, batch_size=cfg.batch_size,
                seed=cfg.seed, color=data.color, lpips_weights=cfg.lpips_weights,
                inception_weights=cfg.inception_weights, num_fid_samples=cfg.num_fid_samples, device=device,
                num_recon_passes=cfg.num_recon_passes, iwae_batch_size=cfg.iwae_batch_size, prefix=cfg.split,
                pixel_reference=reference,
            )
            for name, array in example_images(model, images, cfg.num_examples, cfg.seed, data.color).items():
                examples[f"{arm}/{name}"] = array
        result.settings.update(arm=arm, run_id=trial["run_id"], trial_id=trial["trial_id"], family=config.family,
                               epoch=int(state.get("epoch", -1)), split=cfg.split)
        now = int(time.time() * 1000)
        client.log_batch(
            trial["run_id"],
            metrics=[Metric(k, float(v), now, 0) for k, v in result.metrics.items() if np.isfinite(v)],
            tags=[RunTag(f"unavailable.{k}", reason[:5000]) for k, reason in result.unavailable.items()]
            + [RunTag(f"implementation.{k}", v[:5000]) for k, v in result.implementations.items()],
        )
        client.log_text(trial["run_id"], result.to_json(), "evaluation/evaluation.json")
        arm_files[f"{arm}.json"] = result.to_json()
        evaluated[arm] = {
            "run_id": trial["run_id"], "trial_id": trial["trial_id"], "family": config.family,
            "elbo_valid": bool(result.settings.get("elbo_valid", False)), "metrics": result.metrics,
            "unavailable": result.unavailable, "implementations": result.implementations,
        }
        shown = {k: round(v, 3) for k, v in result.metrics.items() if k.endswith(("_mse_255", "_nll", "_ssim", "_sharpness_ratio"))}
        print(f"evaluated {arm} (run {trial['run_id']}) on {len(data)} {cfg.split} images in "
              f"{time.perf_counter() - started:.1f} s: {shown}; unavailable: {sorted(result.unavailable)}")
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **examples)
    # The whole output directory is replaced at once (DVC keeps it in place, `persist`): a failed run leaves the
    # previous evaluation, and no file of an older sweep's arms survives a new one.
    with atomic_directory(out_dir) as tmp:
        for name, text in arm_files.items():
            (tmp / name).write_text(text)
        (tmp / "examples.npz").write_bytes(buffer.getvalue())
        (tmp / "summary.json").write_text(json.dumps(
            {"split": cfg.split, "num_images": len(data), "color": data.color, "arms": evaluated,
             "settings": cfg.model_dump(mode="json")}, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
