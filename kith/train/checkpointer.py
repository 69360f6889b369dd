"""`Checkpointer`: when the loop writes `checkpoints/last.pt`, what it checks first, and how a run
resumes from it."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path

import torch
from omegaconf import DictConfig

from kith.config import to_yaml
from kith.runs.checkpoint import CHECKPOINT, load_checkpoint, non_finite_keys, save_checkpoint
from kith.runs.resume import resume_changes
from kith.train.state import (
    LoopState,
    checkpoint_contents,
    load_trainer_state,
    model_state,
    own_rng,
    saved_config,
)
from kith.train.step import TrainStep
from kith.utils import distributed as dist
from kith.utils import rng
from kith.utils.errors import UserError, first_line


def shape_mismatch(exc: BaseException) -> str:
    """The keys a failed `load_state_dict` names (`size mismatch for k: ...`, missing / unexpected keys),
    on one line and short."""
    text = str(exc)
    keys = re.findall(r"size mismatch for ([\w.]+)", text)
    if keys:
        more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
        return "other shapes for " + ", ".join(keys[:3]) + more
    return first_line(exc, 200)


class Checkpointer:
    """Writes and restores a run's checkpoint; one per `run_training` call (`begin` binds it to the run).

    Besides the loop's fixed points (every `train.checkpoint_every` epochs, the last epoch, a
    `stop_after_step`), a checkpoint falls due once `train.checkpoint_every_minutes` have passed on
    `clock` (seconds, monotonic) since the last one or the start. Tests inject a clock, or override
    `save` to watch or interrupt the writes.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        # the checkpoint on disk, as the divergence message names it: an epoch, or "epoch, step"
        self.saved_epoch: int | str | None = None

    def begin(self, cfg: DictConfig, run_dir: Path, trainer: TrainStep) -> None:
        """Bind to a run; the minutes count from here."""
        self.cfg, self.run_dir, self.trainer = cfg, run_dir, trainer
        self.saved_epoch = None
        self.last_save = self.clock()

    def time_due(self) -> bool:
        """Whether train.checkpoint_every_minutes have passed since the last checkpoint (or the start).
        Asked only at metrics rows, where the loop waits for the device anyway, and rank 0's clock
        decides for every rank (one 1-element broadcast per row, none when off)."""
        every_s = self.cfg.train.checkpoint_every_minutes * 60
        return every_s > 0 and dist.broadcast_flag(self.clock() - self.last_save >= every_s,
                                                   self.trainer.device)

    def diverged(self, what: str, step: int, epoch: int) -> UserError:
        """The one-line error of a diverged run; it names the checkpoint only when one exists."""
        kept = (f"the last good checkpoint is kept at '{self.run_dir / CHECKPOINT}' "
                f"(epoch {self.saved_epoch})" if self.saved_epoch is not None
                else "no checkpoint was written yet (the first is due after epoch "
                     f"{self.cfg.train.checkpoint_every})")
        return UserError(f"{what} by step {step} (epoch {epoch}); lower train.lr or set "
                         f"train.precision=fp32; {kept}")

    def write(self, state: LoopState, elapsed: float) -> None:
        """Write last.pt at `state` (on every rank: the ranks meet in collectives here), `elapsed` being
        the run's training seconds so far. State that is not finite stops the run instead, and the last
        good checkpoint stays."""
        # a finite loss does not make finite state (BatchNorm statistics overflow first): every rank
        # checks its weights, buffers and optimizer state; the ranks agree, so none waits in a collective
        model = model_state(self.trainer)
        bad = non_finite_keys(model)
        if (dist.all_reduce_sum(torch.tensor([float(len(bad))], device=self.trainer.device)).item()
                if dist.world_size() > 1 else len(bad)):
            where = f" ({', '.join(bad[:3])})" if bad else " on another rank"
            raise self.diverged(f"{len(bad) or 'some'} tensors of the model state are not finite{where}",
                                state.step, state.epoch_label())
        ranks_rng = dist.gather_objects(rng.rng_state())  # a collective: every rank is here at this step
        if dist.is_main_process():
            self.save(checkpoint_contents(model, self.trainer, state.state_dict(elapsed), ranks_rng,
                                          to_yaml(self.cfg)), self.run_dir)
        self.last_save = self.clock()
        self.saved_epoch = (f"{state.epoch + 1}, step {state.epoch_step} of {state.steps_per_epoch}"
                            if state.mid_epoch else state.epoch)

    def save(self, state: dict, run_dir: Path) -> None:
        """The one place a checkpoint reaches the disk (rank 0 only)."""
        save_checkpoint(state, run_dir)

    def restore(self, state: LoopState) -> dict[str, dict]:
        """Load the run's last.pt into the trainer, `state` and this process's generators; returns the
        config keys the resume changes (refused unless resumable). A checkpoint written inside an epoch
        needs the same steps per epoch, else the data order it replays would differ."""
        # on the CPU, whatever the run's device: the RNG states must be CPU tensors (torch.set_rng_state
        # and numpy refuse GPU ones) and load_state_dict puts every weight on its module's device
        ckpt = load_checkpoint(self.run_dir, "cpu")
        changed = resume_changes(saved_config(ckpt) or (self.run_dir / "config.yaml").read_text(), self.cfg)
        try:
            load_trainer_state(self.trainer, ckpt)
        except (RuntimeError, KeyError, ValueError) as exc:  # size mismatch, missing or unexpected keys
            raise UserError(f"the checkpoint '{self.run_dir / CHECKPOINT}' does not fit this run's model "
                            f"({shape_mismatch(exc)}): it was written by another config; start a new run "
                            "with --run-dir") from None
        steps_per_epoch = state.steps_per_epoch
        state.load_state_dict(ckpt)
        done = state.epoch + (1 if state.mid_epoch else 0)
        if self.cfg.train.epochs < done:
            raise UserError(f"train.epochs={self.cfg.train.epochs} is below the {done} epochs this run "
                            f"has {'started' if state.mid_epoch else 'done'}; resume with "
                            f"train.epochs={done} or more (or without train.epochs)")
        if state.mid_epoch and state.steps_per_epoch != steps_per_epoch:
            raise UserError(f"the checkpoint was written inside an epoch of {state.steps_per_epoch} steps, "
                            f"which now has {steps_per_epoch}: resume mid-epoch with the run's own "
                            "train.batch_size and data")
        state.steps_per_epoch = steps_per_epoch
        self.saved_epoch = state.epoch
        rng.set_rng_state(own_rng(ckpt, self.trainer.rank, dist.world_size()))
        return changed
