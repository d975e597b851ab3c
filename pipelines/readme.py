"""Copy a study's generated report tables into README.md, so the README's study numbers are never typed by hand.

The tables go between the markers ``<!-- report:<sweep.name>:begin -->`` and ``<!-- report:<sweep.name>:end -->``
(added at the end of the README the first time), with the machine, the date and the measured wall time of the
study's ``dvc repro``. Run after the study, e.g.::

    /usr/bin/time -f %e -o repro.time uv run dvc repro studies/reproduce/dvc.yaml
    uv run python -m pipelines.readme --params studies/reproduce/params.yaml --wall-time-s "$(cat repro.time)"

Exit code 1 with one ``error:`` line when the report has no tables.
"""

from __future__ import annotations

import datetime
import os
import platform
import re
import shlex
import sys
from pathlib import Path

from pipelines.common import stage_arguments

#: Tables copied, in this order, when the report wrote them (``<report.output_dir>/tables/<name>.md``).
TABLES = ("claims", "dorta_table1", "dorta_table2", "all_metrics", "paired_comparisons", "avae")


def machine() -> str:
    """One line naming the machine: CPU cores and model, GPU if torch sees one."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), cpu)
    except OSError:
        pass
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{cores} CPU cores ({cpu}), {gpu}, torch {torch.__version__}"


def block(name: str, tables: list[str], wall_time_s: float | None, command: str, note: str | None = None) -> str:
    today = datetime.date.today().isoformat()
    wall = (f"{int(wall_time_s // 60)} min {wall_time_s % 60:.0f} s" if wall_time_s is not None else "not measured")
    header = (f"<!-- report:{name}:begin -->\n"
              f"Generated from the study's report by `{command}` on {today}; machine: {machine()}; "
              f"wall time of the study's `dvc repro`: {wall}." + (f" {note}" if note else "") + "\n")
    return header + "\n" + "\n".join(t.strip() + "\n" for t in tables) + f"<!-- report:{name}:end -->"


def update_readme(readme: Path, name: str, content: str) -> None:
    """Replace the marked block of ``name`` in ``readme`` (atomically), or append it."""
    from study.atomic import atomic_write_text

    text = readme.read_text()
    pattern = re.compile(rf"<!-- report:{re.escape(name)}:begin -->.*?<!-- report:{re.escape(name)}:end -->", re.S)
    text = pattern.sub(lambda _: content, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + content
    atomic_write_text(readme, text.rstrip("\n") + "\n")


def main(argv: list[str] | None = None) -> int:
    def configure(parser) -> None:
        parser.add_argument("--readme", type=Path, default=Path("README.md"))
        parser.add_argument("--tables", nargs="+", default=list(TABLES), metavar="NAME",
                            help=f"report tables to copy, in order (default: those of {', '.join(TABLES)} that exist)")
        parser.add_argument("--note", default=None, help="one sentence added under the header (e.g. the load)")
        parser.add_argument("--wall-time-s", type=float, default=None,
                            help="measured wall time of the study's dvc repro, seconds (default: not measured)")

    args, params = stage_arguments(argv, __doc__.splitlines()[0], configure)
    tables_dir = Path(params.report.output_dir) / "tables"
    tables = [(tables_dir / f"{t}.md").read_text() for t in args.tables if (tables_dir / f"{t}.md").is_file()]
    if not tables:
        print(f"error: no report tables in {tables_dir}: run the study's report stage first", file=sys.stderr)
        return 1
    command = "python -m pipelines.readme " + shlex.join(argv if argv is not None else sys.argv[1:])
    update_readme(args.readme, params.sweep.name,
                  block(params.sweep.name, tables, args.wall_time_s, command, args.note))
    print(f"README.md: {len(tables)} tables of {params.sweep.name} from {tables_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
