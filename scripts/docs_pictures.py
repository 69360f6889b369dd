"""Regenerate the documentation's pictures and the digits study table from fresh runs.

    python scripts/docs_pictures.py            # minutes on a CPU; writes what is listed below

- docs/curves.png, docs/embedding.png, docs/retrieval.png: `kith pretrain train.epochs=5` (the digits
  demo), then `kith plot` of that run;
- docs/study_dim.png, benchmarks/results/study_dim.{md,json}: `kith study --kind dim --methods
  simclr,byol --values 16,64,256,1024 train.epochs=20` on the same data.

The runs go to a temporary folder; only the files above are kept.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kith.cli import main as kith  # noqa: E402

STUDY = ["study", "--kind", "dim", "--methods", "simclr,byol", "--values", "16,64,256,1024"]


def run(argv: list[str]) -> None:
    print("$ kith " + " ".join(argv), flush=True)
    if kith(argv) != 0:
        raise SystemExit(f"kith {' '.join(argv)} failed")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo-epochs", type=int, default=5)
    parser.add_argument("--study-epochs", type=int, default=20)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        demo = Path(tmp) / "demo"
        run(["pretrain", f"train.epochs={args.demo_epochs}", "train.progress=false", "--run-dir", str(demo)])
        run(["plot", str(demo)])
        for name in ("curves", "embedding", "retrieval"):
            shutil.copy(demo / "plots" / f"{name}.png", REPO / "docs" / f"{name}.png")
        study = Path(tmp) / "study"
        run([*STUDY, "--out", str(study), f"train.epochs={args.study_epochs}", "train.progress=false"])
        shutil.copy(study / "study.png", REPO / "docs" / "study_dim.png")
        command = " ".join(["kith", *STUDY, "--out", "runs/dim", f"train.epochs={args.study_epochs}"])
        table = (study / "study.md").read_text().replace(f"; runs under `{study}`", "")  # a temporary folder
        (REPO / "benchmarks" / "results" / "study_dim.md").write_text(
            f"Written by `python scripts/docs_pictures.py`, i.e. `{command}`: kNN@200 top-1 on the 360 "
            f"held-out digits after {args.study_epochs} epochs per setting.\n\n" + table)
        shutil.copy(study / "study.json", REPO / "benchmarks" / "results" / "study_dim.json")
    print("wrote docs/{curves,embedding,retrieval,study_dim}.png and benchmarks/results/study_dim.{md,json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
