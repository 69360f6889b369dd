"""What `checkpoints/last.pt` holds, in one place: `LoopState` (where the loop is) and the trainer's
state around it.

The keys are those every kith checkpoint has had; the ones added later (`epoch_step`, `pending`,
`elapsed`, `images_seen`, `steps_per_epoch`, `rank_rng`, `config`) are read with the defaults an
older checkpoint needs, so any checkpoint kith wrote resumes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kith.train.optim import load_optimizer_state
from kith.train.step import TrainStep


@dataclass
class LoopState:
    """The loop's position and counters, which are also the loop part of a checkpoint.

    Inside an epoch `epoch` is the epoch being trained (0-based: also the epochs finished) and
    `epoch_step` the steps done in it; at an epoch end `epoch` counts the finished epochs and
    `epoch_step` is 0. `pending` holds the metrics of the steps since the last metrics row, so a run
    resumed between two rows averages the same steps into the next one. `elapsed` is the training
    time in seconds up to the last epoch end (earlier processes of the run included), `images_seen`
    the source images of every rank.
    """

    steps_per_epoch: int
    epoch: int = 0
    step: int = 0
    epoch_step: int = 0
    pending: list[dict] = field(default_factory=list)
    elapsed: float = 0.0
    images_seen: int = 0

    @property
    def mid_epoch(self) -> bool:
        return self.epoch_step != 0

    def epoch_label(self) -> int:
        """The epoch a message names, 1-based: the one being trained, or the last finished at its end."""
        return self.epoch + (1 if self.mid_epoch else 0)

    def state_dict(self, elapsed: float | None = None) -> dict[str, Any]:
        """The checkpoint's loop keys; `elapsed` replaces the field inside an epoch, where the time since
        the epoch began counts too."""
        return {"epoch": self.epoch, "step": self.step, "epoch_step": self.epoch_step,
                "steps_per_epoch": self.steps_per_epoch, "pending": self.pending,
                "elapsed": self.elapsed if elapsed is None else elapsed, "images_seen": self.images_seen}

    def load_state_dict(self, ckpt: dict[str, Any]) -> None:
        """Take the loop keys of `ckpt`, a whole checkpoint of this or an older kith. Older ones lack
        the keys of mid-epoch resume: they were written at an epoch end."""
        self.epoch, self.step = ckpt["epoch"], ckpt["step"]
        self.epoch_step = ckpt.get("epoch_step", 0)
        self.steps_per_epoch = ckpt.get("steps_per_epoch", self.steps_per_epoch)
        self.pending = ckpt.get("pending", [])
        self.elapsed = ckpt.get("elapsed", 0.0)
        self.images_seen = ckpt.get("images_seen", 0)


def checkpoint_contents(model: dict[str, Any], trainer: TrainStep, loop: dict[str, Any],
                        ranks_rng: list[dict], config_yaml: str) -> dict[str, Any]:
    """The whole checkpoint: `model` (`model_state`'s method and optimizer, checked finite), the grad
    scaler, `loop` (`LoopState.state_dict`), every rank's generator states (`rank_rng` only with more
    than one rank: `rng` is rank 0's) and the run's config as YAML."""
    return {**model, "scaler": trainer.scaler.state_dict(), **loop, "rng": ranks_rng[0],
            "rank_rng": ranks_rng if len(ranks_rng) > 1 else None, "config": config_yaml}


def model_state(trainer: TrainStep) -> dict[str, Any]:
    """The method's and the optimizer's state: what the finiteness check reads before a save."""
    state = {"method": trainer.method.state_dict(), "optimizer": trainer.optimizer.state_dict()}
    if trainer.online is not None:  # train.online_linear's classifier and its optimizer
        state["online_linear"] = trainer.online.state_dict()
    return state


def load_trainer_state(trainer: TrainStep, ckpt: dict[str, Any]) -> None:
    """Restore the method, the optimizer (keeping the config's hyperparameters) and the grad scaler."""
    trainer.method.load_state_dict(ckpt["method"])
    load_optimizer_state(trainer.optimizer, ckpt["optimizer"])
    if trainer.online is not None and ckpt.get("online_linear"):
        trainer.online.load_state_dict(ckpt["online_linear"])
    if ckpt["scaler"] and trainer.scaler.is_enabled():  # empty when saved without fp16 (e.g. another device)
        trainer.scaler.load_state_dict(ckpt["scaler"])


def saved_config(ckpt: dict[str, Any]) -> str | None:
    """The run's config as the checkpoint saved it (None in checkpoints older than that key)."""
    return ckpt.get("config")


def own_rng(ckpt: dict[str, Any], rank: int, world: int) -> dict:
    """This rank's generator states: its own where the checkpoint has every rank's (dropout draws differ
    per rank, e.g. one CUDA generator per device), else rank 0's."""
    ranks_rng = ckpt.get("rank_rng") or []
    return ranks_rng[rank] if len(ranks_rng) == world else ckpt["rng"]
