"""The GPU reproduction run's logic on the CPU: budget arithmetic, the JPEG pack decode, the
cifar-python folder kith reads, the wrapper's wheel step, and a whole `--tiny` run through the
wrapper (benchmarks/gpu_run.sh) with its JSON."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks import gpu_cifar as gpu

REPO = Path(__file__).resolve().parents[2]
WRAPPER = REPO / "benchmarks" / "gpu_run.sh"




def make_pack(path: Path, num_train: int, num_test: int, seed: int = 0, sort_labels: bool = False
              ) -> dict[str, np.ndarray]:
    """A pack in the layout of /work/shared/data/cifar10 (JPEG bytes back to back, offsets, labels;
    that pack is sorted by class, as `sort_labels` makes this one)."""
    from PIL import Image

    rs = np.random.RandomState(seed)
    arrays: dict[str, np.ndarray] = {"classes": np.array(gpu.CLASSES)}
    for split, n in (("train", num_train), ("test", num_test)):
        blobs = []
        for _ in range(n):
            buf = io.BytesIO()
            Image.fromarray(rs.randint(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, "JPEG", quality=75)
            blobs.append(np.frombuffer(buf.getvalue(), dtype=np.uint8))
        arrays[f"{split}_jpeg"] = np.concatenate(blobs)
        ends = np.cumsum([len(b) for b in blobs])
        arrays[f"{split}_offsets"] = np.concatenate([[0], ends]).astype(np.int64)
        labels = np.arange(n) * 10 // n if sort_labels else rs.randint(0, 10, n)
        arrays[f"{split}_labels"] = labels.astype(np.uint8)
    np.savez(path, **arrays)
    return arrays


def pil_decode(blob: np.ndarray, offsets: np.ndarray, i: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(blob[offsets[i]:offsets[i + 1]].tobytes())).convert("RGB"))


def test_plan_epochs_fits_the_budget_and_clamps():
    plan = gpu.plan_epochs(budget_s=480, elapsed_s=60, epoch_s=2.0, eval_s=5, reserve_s=25, safety=0.05,
                           max_epochs=200)
    assert plan["available_s"] == pytest.approx(480 - 60 - 25 - 2 * 5)
    assert plan["epochs"] == int(385 * 0.95 // 2.0) == 182
    assert plan["limited_by"] == "budget"
    assert gpu.plan_epochs(480, 60, 1.0, 5, 25, 0.05, 200)["epochs"] == 200  # fits more: lightly's 200
    late = gpu.plan_epochs(480, 479, 2.0, 5, 25, 0.05, 200)
    assert late["epochs"] == 1 and late["limited_by"] == "minimum of 1"  # out of time: still one epoch


def test_epoch_seconds_counts_full_batches():
    # 50,000 images at batch 512: 97 full steps of 512 images
    assert gpu.epoch_seconds(10_000.0, 50_000, 512, 1.0) == pytest.approx(97 * 512 / 10_000)
    assert gpu.epoch_seconds(10_000.0, 50_000, 512, 1.1) == pytest.approx(1.1 * 97 * 512 / 10_000)


def test_pack_decode_matches_pil_and_writes_a_folder_kith_reads(tmp_path):
    from kith.data.arrays import load_cifar_split

    arrays = make_pack(tmp_path / "pack.npz", 40, 5, sort_labels=True)
    train, test = gpu.load_pack(tmp_path / "pack.npz", num_train=20)
    assert train.images.shape == (20, 3, 32, 32) and train.images.dtype == torch.uint8
    assert test.images.shape == (5, 3, 32, 32)
    # a subset of a class-sorted pack is class-balanced, not the first classes only
    assert torch.bincount(train.labels, minlength=10).tolist() == [2] * 10
    for image, label in zip(train.images, train.labels):
        i = next(j for j in range(40) if np.array_equal(
            pil_decode(arrays["train_jpeg"], arrays["train_offsets"], j), image.permute(1, 2, 0).numpy()))
        assert arrays["train_labels"][i] == label
    for i in range(5):
        assert np.array_equal(test.images[i].permute(1, 2, 0).numpy(),
                              pil_decode(arrays["test_jpeg"], arrays["test_offsets"], i))
    assert test.labels.tolist() == arrays["test_labels"].tolist()

    root = gpu.write_cifar_python(train, test, tmp_path / "cifar")
    loaded = load_cifar_split("cifar10", str(root), "train", download=False)
    assert torch.equal(loaded.images, train.images) and torch.equal(loaded.labels, train.labels)
    assert loaded.classes == list(gpu.CLASSES)
    assert torch.equal(load_cifar_split("cifar10", str(root), "test", download=False).images, test.images)


def make_wheel(folder: Path, name: str) -> Path:
    """A minimal pure-Python wheel (one module) built from nothing, for the wrapper's pip step."""
    dist = f"{name}-0.1.dist-info"
    files = {f"{name}/__init__.py": "VALUE = 42\n",
             f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n",
             f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                              "Tag: py3-none-any\n"}
    files[f"{dist}/RECORD"] = "".join(f"{p},,\n" for p in [*files, f"{dist}/RECORD"])
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / f"{name}-0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for path, text in files.items():
            zf.writestr(path, text)
    return wheel


def run_wrapper(tmp_path: Path, timeout: int = 300, **env: str) -> subprocess.CompletedProcess:
    full = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path / "out"),
            "GPU_SITE": str(tmp_path / "site"), **env}
    full.pop("PYTHONPATH", None)
    return subprocess.run(["bash", str(WRAPPER)], check=False, env=full, capture_output=True, text=True,
                          timeout=timeout)


def test_wrapper_installs_missing_module_from_wheels(tmp_path):
    make_wheel(tmp_path / "wheels", "kith_wheel_probe")
    proc = run_wrapper(tmp_path, GPU_RUN_STEP="install", GPU_WHEELS=str(tmp_path / "wheels"),
                       GPU_NEED_MODULE="kith_wheel_probe")
    assert proc.returncode == 0, proc.stderr
    assert "installed kith_wheel_probe-0.1-py3-none-any.whl" in proc.stdout
    assert (tmp_path / "site" / "kith_wheel_probe" / "__init__.py").is_file()


def test_wrapper_skips_wheels_when_module_importable_and_fails_clearly_without_them(tmp_path):
    proc = run_wrapper(tmp_path, GPU_RUN_STEP="install", GPU_NEED_MODULE="json",
                       GPU_WHEELS=str(tmp_path / "none"))
    assert proc.returncode == 0 and "json is importable; no wheels installed" in proc.stdout
    assert not (tmp_path / "site").exists()
    proc = run_wrapper(tmp_path, GPU_RUN_STEP="install", GPU_NEED_MODULE="kith_no_such_module",
                       GPU_WHEELS=str(tmp_path / "none"))
    assert proc.returncode != 0 and "holds no wheels" in proc.stderr


def test_tiny_run_through_the_wrapper_writes_the_json(tmp_path):
    make_pack(tmp_path / "pack.npz", 200, 100)
    args = (f"--tiny --data {tmp_path / 'pack.npz'} --work {tmp_path / 'work'} --num-train 192 --num-test 96 "
            "--batch-size 32 --methods byol,msf")  # every method: the same code (CPU time)
    proc = run_wrapper(tmp_path, GPU_ARGS=args, GPU_BUDGET_S="300")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = tmp_path / "out"
    doc = json.loads((out / "gpu_cifar.json").read_text())
    assert "kNN@200" in (out / "gpu_cifar.log").read_text()

    assert doc["tiny"] is True and doc["device"]["type"] == "cpu"
    assert doc["device"]["torch"] == torch.__version__
    assert doc["data"]["num_train"] == 192 and doc["data"]["source"].endswith("pack.npz")
    assert list(doc["throughput"]) == ["byol", "msf"]
    assert doc["throughput_skipped"] == []
    assert list(doc["throughput"]["msf"]) == ["eager", "compiled"]
    # BYOL graphed on the CPU stand-in: the graphed mode's wiring, augmentation in the graph included
    assert list(doc["throughput"]["byol"]) == ["eager", "compiled", "graphed"]
    graphed = doc["throughput"]["byol"]["graphed"]
    assert graphed["graph"].startswith("ReplayCheck")
    assert graphed["cuda_graph"] and graphed["augment_in_graph"]
    for method, modes in doc["throughput"].items():
        for mode, res in modes.items():
            for key in ("model_only", "full_step"):
                assert res[key]["images_per_s"] > 0 and res[key]["timed_steps"] == 2
        compiled = modes["compiled"]
        assert compiled["compiled_graphs"] == 1 and compiled["graph_breaks"] == 0, (method, compiled)
        assert compiled["recompiles"] == 0 and compiled["fallbacks"] == 0, (method, compiled)

    plan = doc["budget"]
    assert plan["budget_s"] == 300 and plan["max_epochs"] == 1 and plan["epochs"] == 1
    again = gpu.plan_epochs(plan["budget_s"], plan["elapsed_before_training_s"], plan["epoch_s_estimate"],
                            plan["knn_eval_s"], plan["reserve_s"], plan["safety"], plan["max_epochs"])
    assert again == plan
    byol_rate = doc["throughput"]["byol"]["eager"]["full_step"]["images_per_s"]
    assert plan["epoch_s_estimate"] == pytest.approx(
        gpu.epoch_seconds(byol_rate, 192, 32, doc["settings"]["epoch_overhead"]))

    train = doc["training"]
    assert train["epochs"] == 1 and train["preset"] == "cifar10/byol"
    assert train["overrides"]["train.epochs"] == 1 and train["overrides"]["train.batch_size"] == 32
    assert train["lr_used"] == pytest.approx(train["base_lr"] * 32 / 256)
    assert 0 <= train["knn"]["200"] <= 100 and "20" in train["knn_random_init"]
    assert doc["reference"]["value"] == 86.8 and doc["reference"]["epochs"] == 200
    assert doc["wall"]["total_s"] > doc["wall"]["throughput_s"] > 0
    assert (out / "byol_metrics.jsonl").is_file()


def test_the_throughput_part_stops_at_its_deadline_and_lists_what_it_skipped(tmp_path, monkeypatch):
    calls, now = [], [0.0]

    def fake_bench(method, settings, data_root, mode):  # 40 s of the script's clock each
        calls.append((method, mode))
        now[0] += 40.0
        return {"model_only": {"images_per_s": 2.0}, "full_step": {"images_per_s": 1.0}, "efficiency": 0.5}

    monkeypatch.setattr(gpu, "bench_method", fake_bench)
    monkeypatch.setattr(gpu, "elapsed", lambda: now[0])
    settings = gpu.Settings.for_mode(True, gpu.parse_args(["--tiny", "--out", str(tmp_path)]))
    doc: dict = {}
    gpu.measure_throughput(doc, ["byol", "simclr", "msf"], settings, tmp_path, 100.0, tmp_path)
    assert calls == [("byol", "eager"), ("simclr", "eager"), ("msf", "eager")]
    assert doc["throughput_skipped"] == ["byol compiled", "simclr compiled", "msf compiled", "byol graphed"]
    # written after each measurement: a run cut off later still has these
    written = json.loads((tmp_path / "gpu_cifar.json").read_text())
    assert written["throughput"]["msf"]["eager"]["efficiency"] == 0.5


def test_a_failed_measurement_is_recorded_not_raised():
    errors: dict[str, str] = {}
    assert gpu.attempt("pil", lambda: {"images_per_s": 1 / 0}, errors) is None
    assert errors == {"pil": "ZeroDivisionError: division by zero"}
    assert gpu.attempt("kith", lambda: {"images_per_s": 2.0}, errors) == {"images_per_s": 2.0}
