"""DVC stage ``report``: the sweep's MLflow runs -> ``reports/`` tables, metrics.json and figures.

With seed replicates in the evaluation, the tables give each metric as mean +- 95% CI over seeds,
``tables/paired_comparisons`` compares every arm with ``report.baseline`` image by image, and ``metrics.json``
gets a ``replicates`` block (per-arm intervals and the paired comparisons).
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

from pipelines.common import stage_arguments, sweep_summary


#: Everything the report stage writes in ``report.output_dir`` (its DVC outputs, and the Pareto page).
REPORT_OUTPUTS = ("trials.csv", "summary.md", "metrics.json", "best_reconstructions.png", "pareto_front.md",
                  "tables", "figures")


def _write_claims(params, evaluation: Path, staging: Path, metrics: dict) -> None:
    """``tables/claims.md``, a "Published claims" section of summary.md and ``claims`` in metrics.json."""
    from study.report_claims import claims_table, evaluate_claims, load_split, trivial_baseline
    from study.report_replicates import load_evaluation

    result, per_image = load_evaluation(evaluation)
    baseline = None
    if result.get("color") in ("grey", "rgb"):  # YCbCr arms are scored against RGB the stored arrays lack
        data_dir = params.dataset_dir()
        baseline = trivial_baseline(load_split(data_dir, "train"), load_split(data_dir, result.get("split", "test")))
    records = evaluate_claims(result, per_image, params.report.claims, baseline)
    table = ("*Published claims tested by this study, each judged from the seed replicates (study/report_claims.py "
             "says how); a claim that does not hold here is a finding, reported as measured.*\n\n"
             + claims_table(records))
    (staging / "tables").mkdir(exist_ok=True)
    (staging / "tables" / "claims.md").write_text(table)
    summary_md = staging / "summary.md"
    summary_md.write_text(summary_md.read_text() + "\n## Published claims\n\n" + table)
    metrics["claims"] = records
    metrics["trivial_baseline"] = baseline
    (staging / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    for record in records:
        print(f"claim: {record['claim']} ({', '.join(record['arms'][:2])}): {record['verdict']}")


def main(argv: list[str] | None = None) -> int:
    _, params = stage_arguments(argv, __doc__)
    from study.atomic import publish
    from study.report import write_report
    from study.tracking import connect, tracking_uri

    summary = sweep_summary(params)
    if summary is None:
        return 1
    client, _ = connect(params.tracking)
    output_dir = Path(params.report.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    # Built aside and moved in at the end (DVC keeps the outputs in place, `persist`): a failed run leaves the
    # previous report whole, and a new one leaves nothing of an older sweep behind.
    staging = Path(tempfile.mkdtemp(prefix=".report-staging-", dir=output_dir))
    try:
        metrics = write_report(summary, staging, client)
        evaluation = Path(params.evaluate.output_dir)
        if (evaluation / "summary.json").is_file():
            from study.report import load_runs, trials_table, write_paper_report

            runs = load_runs(client, summary["experiment_id"], summary["parent_run_id"])
            trials = trials_table(runs, sorted({k for t in summary["trials"] for k in t["config"]}))
            written = write_paper_report(evaluation, staging, trials, baseline=params.report.baseline)
            summary_md = staging / "summary.md"
            tables = [written[f"{name}.md"].read_text()
                      for name in ("dorta_table1", "dorta_table2", "avae", "all_metrics", "paired_comparisons")
                      if f"{name}.md" in written]
            heading = "Test-set evaluation of the best trial per arm" + (
                " and of its seed replicates" if "paired_comparisons.md" in written else "")
            summary_md.write_text(summary_md.read_text() + f"\n## {heading}\n\n"
                                  + "\n".join(tables) + "\nFigures: `figures/`.\n")
            print(f"paper tables and figures: {', '.join(sorted(written))}")
            from study.report_replicates import load_evaluation, replicate_metrics

            block = replicate_metrics(*load_evaluation(evaluation), baseline=params.report.baseline)
            if block is not None:
                metrics["replicates"] = block
                (staging / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
            if params.report.claims is not None:
                _write_claims(params, evaluation, staging, metrics)
        publish(staging, output_dir, REPORT_OUTPUTS)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    from study.formatting import format_value

    best = metrics.get("best", {})
    print(f"report in {output_dir}/: {metrics['num_trials']} trials, best {best.get('setting')} "
          f"val_elbo {format_value(best.get('val_elbo'))} nats, val_mse_255 {format_value(best.get('val_mse_255'))}")
    print("\n".join(where_to_look(tracking_uri(params.tracking), summary, output_dir)))
    return 0


def where_to_look(uri: str, summary: dict, output_dir: Path) -> list[str]:
    """The stage's last lines (the last of a ``dvc repro``): the report's files and how to open the sweep's run
    in the MLflow UI."""
    run = f"experiment {summary['experiment_id']}, sweep run {summary['parent_run_id']}"
    if uri.startswith(("http://", "https://")):
        ui = f"open {uri.rstrip('/')}/#/experiments/{summary['experiment_id']}/runs/{summary['parent_run_id']}"
    else:
        ui = f"uv run mlflow ui --backend-store-uri {uri} --host 127.0.0.1, then {run}"
    return ["where to look next:",
            f"  summary and tables: {output_dir / 'summary.md'}, {output_dir / 'tables'}/",
            f"  figures:            {output_dir / 'figures'}/",
            f"  MLflow:             {ui}"]


if __name__ == "__main__":
    sys.exit(main())
