"""The Python API: pretrain, evaluate (kNN), load_backbone; probe_run / probe_backbone \
(kNN + linear probe)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from kith.config import build_config
from kith.errors import UserError
from kith.nn.backbones import build_backbone
from kith.run import is_torchscript, load_file

DEFAULT_EVAL_K = (10, 20, 100, 200)  # `kith eval` / `probe_run` default kNN k values


def pretrain(preset: str | None = None, run_dir: str | Path | None = None, resume: bool = False,
             overwrite: bool = False, **overrides):
    """Train a method and return a `RunResult` (run folder, kNN of trained and random-init backbone).

    `kith.pretrain("cifar10/byol", **{"train.epochs": 5, "data.path": "data"})` is the same as
    `kith pretrain preset=cifar10/byol train.epochs=5 data.path=data`. A `run_dir` that already
    holds a run needs `resume=True` (overrides: see `kith.train.run_training`) or `overwrite=True`.
    """
    from kith.run import load_run_config
    from kith.train import run_training

    items = [f"{k}={v}" for k, v in overrides.items()]
    if preset:
        items.insert(0, f"preset={preset}")
    if resume:
        if run_dir is None:
            raise UserError("resume=True needs run_dir")
        cfg = load_run_config(run_dir, items)
    else:
        cfg = build_config(items)
    return run_training(cfg, run_dir=run_dir, resume=resume, overwrite=overwrite)


def _read_file(file: Path, explicit: bool):
    """A checkpoint or backbone file, loaded weights-only (`kith.run.load_file`: a crafted file cannot run
    code). A TorchScript archive only when the user named the file itself (`explicit`), never out of a
    run folder: loading one runs the code it holds."""
    if explicit and is_torchscript(file):
        print(f"kith: note: '{file}' is a TorchScript archive; loading it runs the code it holds, so "
              "load only files you trust", file=sys.stderr)
        try:
            return torch.jit.load(str(file), map_location="cpu")
        except Exception as exc:  # noqa: BLE001
            raise UserError(f"cannot read TorchScript archive '{file}': {_first_line(exc)}") from None
    try:
        return load_file(file)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001  (truncated or foreign)
        raise UserError(f"cannot read checkpoint '{file}': {_first_line(exc)}") from None


def _first_line(exc: Exception) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _checkpoint_file(path: Path) -> Path:
    file = path / "checkpoints" / "last.pt" if path.is_dir() else path
    if path.is_dir() and not file.is_file():
        what = "a kith run folder" if (path / "config.yaml").is_file() else "not a kith run folder"
        raise UserError(f"no checkpoint at '{file}' ('{path}' is {what}); pass a run folder or a .pt file")
    if not path.exists():
        raise UserError(f"'{path}' does not exist; pass a run folder or a checkpoint (.pt) file")
    if not file.is_file():
        raise UserError(f"no checkpoint at '{file}'; pass a run folder or a .pt file")
    return file


def backbone_state(method_state: dict) -> dict:
    """The online backbone's weights out of a method state_dict."""
    prefix = "backbone."
    return {k[len(prefix):]: v for k, v in method_state.items() if k.startswith(prefix)}


def load_backbone(path: str | Path, overrides: list[str] | None = None) -> torch.nn.Module:
    """The trained online backbone of a run folder, checkpoint or exported backbone file, in eval mode,
    on the CPU."""
    return load_eval_target(path, overrides)[0]


def _strip_prefix(state: dict, prefix: str) -> dict:
    if state and all(k.startswith(prefix) for k in state):
        return {k[len(prefix):]: v for k, v in state.items()}
    return state


def _load_weights(backbone: torch.nn.Module, state: dict, cfg: DictConfig, file: Path) -> None:
    state = _strip_prefix(_strip_prefix(dict(state), "module."), "backbone.")
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}  # a torchvision head, if any
    try:
        backbone.load_state_dict(state)
    except RuntimeError as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        detail = lines[1] if len(lines) > 1 else lines[0]
        raise UserError(f"the weights in '{file}' do not fit backbone.name={cfg.backbone.name} "
                        f"(width {cfg.backbone.width}); set backbone.* to the trained network "
                        f"({detail[:120]})"
                        ) from None


def load_eval_target(path: str | Path, overrides: list[str] | None = None
                     ) -> tuple[torch.nn.Module, DictConfig, dict]:
    """(backbone in eval mode on the CPU, resolved config, info) for evaluating a run folder or a file.

    Accepted: a run folder (its checkpoints/last.pt); a kith training checkpoint (`method`
    and `config` inside); a dict with `config` and a `backbone` (or `state_dict`)
    state_dict; a `kith export` state_dict file (`state_dict` plus the backbone's name,
    stem, width and image size, but no data: `overrides` must name `data.*` or a preset);
    a bare backbone state_dict (`overrides` name `backbone.*` and `data.*`) or a
    TorchScript backbone (`overrides` name `data.*`).
    `overrides` (`key=value`) also apply on top of a saved config (e.g. a moved `data.path`).
    info: `file`; `method`, `step` and `epoch` when the file records them.
    """
    file = _checkpoint_file(Path(path))
    obj = _read_file(file, explicit=not Path(path).is_dir())
    overrides = list(overrides or [])
    info: dict = {"file": str(file)}

    def config_from_overrides(known: list[str]) -> DictConfig:
        """A file without a config: the user names the data (and, for a bare state_dict, the network)."""
        if not any(o.startswith(("data.", "preset=")) for o in overrides):
            raise UserError(f"'{file}' holds no run config; say which data to evaluate on with "
                            "data.name=... data.path=... (or preset=...)")
        return build_config(known + overrides)

    if isinstance(obj, torch.nn.Module):  # TorchScript or a pickled module
        return obj.eval(), config_from_overrides([]), info
    if not isinstance(obj, dict):
        raise UserError(f"'{file}' holds a {type(obj).__name__}, not a kith checkpoint or backbone "
                        "state_dict")
    if "config" in obj:
        cfg = build_config(overrides, base=OmegaConf.create(obj["config"]))
        info["method"] = cfg.method.name
    elif isinstance(obj.get("state_dict"), dict) and isinstance(obj.get("backbone"), str):  # `kith export`
        known = [f"backbone.name={obj['backbone']}"]
        known += [f"backbone.{k}={obj[k]}" for k in ("cifar_stem", "width") if k in obj]
        if "image_size" in obj:
            known.append(f"data.size={obj['image_size']}")
        cfg = config_from_overrides(known)
    elif obj and all(torch.is_tensor(v) for v in obj.values()):
        if not any(o.startswith("backbone.") for o in overrides):
            raise UserError(f"'{file}' is a bare state_dict without a config; say which network it is "
                            "with backbone.name=... (and data.* for the data to evaluate on)")
        cfg = config_from_overrides([])
    else:
        raise UserError(f"'{file}' is not a kith checkpoint (no config inside)")
    if "method" in obj:
        state = backbone_state(obj["method"])
    elif isinstance(obj.get("backbone"), dict):
        state = obj["backbone"]
    elif isinstance(obj.get("state_dict"), dict):
        state = obj["state_dict"]
    else:
        state = obj
    backbone, _ = build_backbone(cfg.backbone.name, cfg.backbone.cifar_stem, cfg.backbone.width)
    _load_weights(backbone, state, cfg, file)
    for key in ("step", "epoch"):
        if isinstance(obj.get(key), int):
            info[key] = obj[key]
    return backbone.eval(), cfg, info


def probe_backbone(backbone: torch.nn.Module, cfg: DictConfig, ks: list[int] | None = None,
                      linear: bool = True, linear_epochs: int | None = None, linear_augment: bool = False,
                      device: str = "auto", seed: int = 0, progress: bool = False, splits=None) -> dict:
    """kNN (each k) and, with `linear`, a linear probe of a frozen backbone on `cfg.data`.

    `splits`: the `(train, test)` ImageData of `cfg.data` when already loaded (else loaded here).

    Returns `{"knn": {k: top1 %}, "linear": {"top1", "top5"} or {}, "num_train", "num_test",
    "feature_dim", "time_s"}`. Features are extracted once (eval mode, clean images) and
    shared by kNN and the probe.
    """
    import time

    from kith.data.sources import load_splits, normalisation_stats
    from kith.device import resolve_device
    from kith.probe import (
        LINEAR_EPOCHS,
        extract_features,
        knn_accuracy,
        linear_probe,
        linear_probe_augmented,
    )

    tic = time.perf_counter()
    dev = resolve_device(device)
    train, test = splits if splits is not None else load_splits(cfg.data, cfg.seed)
    if not test.has_labels or not train.has_labels:
        raise UserError(f"data '{cfg.data.name}' has no labels in both splits; kNN and linear evaluation "
                        "need labelled train and test images")
    mean, std = normalisation_stats(cfg.data)
    size, bs = cfg.data.size, cfg.eval.batch_size
    backbone = backbone.to(dev).eval()
    train_f = extract_features(backbone, train, size, mean, std, dev, bs, progress, "train features")
    test_f = extract_features(backbone, test, size, mean, std, dev, bs, progress, "test features")
    ks = list(ks or DEFAULT_EVAL_K)
    knn = knn_accuracy(train_f, train.labels, test_f, test.labels, ks, cfg.eval.knn_temperature)
    out: dict = {"knn": knn,
                 "linear": {}, "num_train": len(train), "num_test": len(test),
                 "feature_dim": int(train_f.shape[1])}
    if linear:
        epochs = linear_epochs or LINEAR_EPOCHS
        num_classes = max(train.num_classes, test.num_classes)
        if linear_augment:
            # flip as the run's own strong recipe does (the digits demo turns flips off)
            flip = float(cfg.augment.strong.flip_prob) if "strong" in cfg.augment else 0.5
            out["linear"] = linear_probe_augmented(backbone, train, test, size, mean, std, dev, epochs, seed,
                                                   train_features=train_f, test_features=test_f,
                                                   flip_prob=flip, progress=progress)
        else:
            out["linear"] = linear_probe(train_f, train.labels, test_f, test.labels, epochs=epochs, seed=seed,
                                         num_classes=num_classes, progress=progress)
        out["linear_epochs"] = epochs
        out["linear_augment"] = linear_augment
    out["time_s"] = time.perf_counter() - tic
    return out


def probe_run(path: str | Path, ks: list[int] | None = None, linear: bool = True,
                 linear_epochs: int | None = None, linear_augment: bool = False, device: str = "auto",
                 seed: int = 0, overrides: list[str] | None = None, progress: bool = False) -> dict:
    """`probe_backbone` for a run folder or checkpoint/backbone file (see `load_eval_target`)."""
    backbone, cfg, info = load_eval_target(path, overrides)
    out = probe_backbone(backbone, cfg, ks, linear, linear_epochs, linear_augment, device, seed, progress)
    out.update({k: info[k] for k in ("step", "epoch") if k in info})
    out.update(method=info.get("method") or "exported backbone", data=cfg.data.name,
               backbone=cfg.backbone.name)
    return out


def evaluate(path: str | Path, ks: list[int] | None = None, device: str = "auto") -> dict[int, float]:
    """Weighted kNN top-1 (percent) of a run's backbone on its data's test split (k: the run's eval.knn_k).

    `probe_run` adds the linear probe and more k values.
    """
    backbone, cfg, _ = load_eval_target(path)
    return probe_backbone(backbone, cfg, ks or list(cfg.eval.knn_k), linear=False, device=device)["knn"]
