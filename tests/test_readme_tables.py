"""pipelines.readme: the README's study tables are the report's files, copied verbatim between markers."""

from __future__ import annotations

import yaml

from pipelines.readme import main


def test_tables_are_copied_verbatim_and_replaced_in_place(tmp_path):
    tables = tmp_path / "reports" / "tables"
    tables.mkdir(parents=True)
    (tables / "claims.md").write_text("| claim | verdict |\n|---|---|\n| a | **holds** |\n")
    (tables / "dorta_table1.md").write_text("| arm | NLL |\n|---|---|\n| gaussian | -1 |\n")
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"sweep": {"name": "demo"}, "report": {"output_dir": str(tmp_path / "reports")}}))
    readme = tmp_path / "README.md"
    readme.write_text("# Title\n\nIntro.\n")
    assert main(["--params", str(params), "--readme", str(readme), "--wall-time-s", "125"]) == 0
    first = readme.read_text()
    assert first.startswith("# Title\n\nIntro.\n")
    assert "| a | **holds** |" in first and "| gaussian | -1 |" in first
    assert first.index("**holds**") < first.index("| gaussian |")  # the claims table first
    assert "2 min 5 s" in first and "CPU cores" in first
    (tables / "claims.md").write_text("| claim | verdict |\n|---|---|\n| a | **does not hold** |\n")
    readme.write_text(readme.read_text() + "\nLater section.\n")
    assert main(["--params", str(params), "--readme", str(readme)]) == 0
    second = readme.read_text()
    assert second.count("<!-- report:demo:begin -->") == 1 and "**holds**" not in second
    assert "**does not hold**" in second and second.rstrip().endswith("Later section.")
    assert "wall time of the study's `dvc repro`: not measured" in second


def test_no_tables_is_an_error(tmp_path, capsys):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"report": {"output_dir": str(tmp_path / "none")}}))
    assert main(["--params", str(params), "--readme", str(tmp_path / "README.md")]) == 1
    assert "no report tables" in capsys.readouterr().err
