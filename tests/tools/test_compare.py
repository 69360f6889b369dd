"""`kith compare`: the table and CSV of finished runs."""

from __future__ import annotations

import json

from kith.tools.compare import compare, run_row, to_csv


# ---- compare ----------------------------------------------------------------------------
def test_compare_table_of_two_runs(runs, tmp_path):
    csv_file, md_file = tmp_path / "t.csv", tmp_path / "t.md"
    table = compare([runs["simclr"], runs["byol"]], csv_path=csv_file, markdown_path=md_file)
    lines = table.strip().splitlines()
    assert lines[0] == ("| run | method | data | backbone | epochs | kNN@20 | kNN@200 | linear top-1 "
                        "| wall time | images/s |")
    assert len(lines) == 4
    assert lines[2].startswith("| simclr | simclr | digits | tiny | 2 |")
    assert lines[3].startswith("| byol | byol | digits | tiny | 2 |")
    assert md_file.read_text() == table
    header, *body = csv_file.read_text().strip().splitlines()
    assert header.split(",")[:5] == ["name", "method", "data", "backbone", "epochs"]
    assert len(body) == 2
    row = run_row(runs["byol"])
    assert row["knn_source"] == "final" and row["knn@5"] > 0 and row["images_per_s"] > 0

def test_compare_prefers_latest_eval_row(runs, tmp_path):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(runs["simclr"], run)
    with open(run / "metrics.jsonl", "a") as fh:
        row = {"kind": "eval", "knn_top1@20": 11.0, "knn_top1@200": 12.0, "linear_top1": 13.0}
        fh.write(json.dumps(row) + "\n")
        fh.write(json.dumps({"kind": "eval", "knn_top1@20": 21.0, "knn_top1@200": 22.0, "linear_top1": 23.0,
                             "linear_top5": 50.0}) + "\n")
    row = run_row(run)
    got = (row["knn@20"], row["knn@200"], row["linear_top1"], row["knn_source"])
    assert got == (21.0, 22.0, 23.0, "eval")
    assert "| 21.00 | 22.00 | 23.00 |" in compare([run])
    assert "23.0" in to_csv([row])
