"""One training step (`TrainStep`): augment, forward, backward, optimizer and EMA updates, optionally
compiled; plus the fast-path switches it uses (channels_last, DDP wrapping, compile counters)."""

from __future__ import annotations

import dataclasses
import inspect
import sys
import time

import torch
from omegaconf import DictConfig

from kith.data.augment import BatchAugment
from kith.data.loader import Batch
from kith.data.spec import image_spec
from kith.data.views import ViewPlan, make_views
from kith.methods.base import Method
from kith.methods.context import StepInfo
from kith.train.graphed import CudaGraphs, GraphedStep
from kith.train.optim import build_optimizer, lr_factor, set_lr
from kith.utils import rng
from kith.utils.device import resolve_precision, to_device
from kith.utils.errors import UserError


def wrap_distributed(method: Method) -> torch.nn.Module:
    """DDP without per-forward buffer broadcasts: queues are identical on every rank by construction
    (all-gathered pushes), and BatchNorm statistics are synchronised by SyncBatchNorm on GPUs."""
    ddp = torch.nn.parallel.DistributedDataParallel
    if "forward_sync_buffers" in inspect.signature(ddp.__init__).parameters:
        return ddp(method, forward_sync_buffers=False)
    return ddp(method, broadcast_buffers=False)


def use_channels_last(setting: str | bool, device: torch.device, module: torch.nn.Module) -> bool:
    """`train.channels_last`: auto = on for convolutional networks on CUDA (cuDNN's fast NHWC kernels;
    on CPU NCHW is as fast or faster), true/false force it."""
    value = str(setting).lower()
    if value == "auto":
        return device.type == "cuda" and any(isinstance(m, torch.nn.Conv2d) for m in module.modules())
    return value == "true"


def use_cudnn_benchmark(setting: bool, device: torch.device) -> bool:
    """`train.cudnn_benchmark` on CUDA: set `torch.backends.cudnn.benchmark` (a process-wide switch) for
    the run's fixed shapes; elsewhere it is left as it is. Returns whether it is on for this run."""
    if device.type != "cuda":
        return False
    torch.backends.cudnn.benchmark = bool(setting)
    return bool(setting)


def sync_batchnorm(method: Method, momentum: bool = True) -> Method:
    """`method` with SyncBatchNorm for BatchNorm: everywhere (`momentum`, `train.sync_bn_momentum`: the
    whole model, as solo-learn does), or in all but its momentum networks, whose BatchNorm then keeps
    each rank's batch statistics (no collective in the teacher's forward)."""
    convert = torch.nn.SyncBatchNorm.convert_sync_batchnorm
    if momentum:
        return convert(method)
    teachers = {name for _, name in method._momentum_pairs}
    for name, child in list(method.named_children()):
        if name not in teachers:
            setattr(method, name, convert(child))
    return method


def compile_stats(since: dict[str, int] | None = None) -> dict[str, int]:
    """torch.compile's counters in this process (minus those of `since`, an earlier reading): graphs
    compiled (a recompile adds one), graph breaks, frames compiled (a graph break adds a frame, a
    recompile compiles one again) and fallbacks: frames dynamo gave up on (its recompile limit, code it
    cannot trace), which then run eagerly for good."""
    from torch._dynamo.utils import counters

    frames = counters["frames"]
    now = {"compiled_graphs": int(counters["stats"]["unique_graphs"]),
           "graph_breaks": int(sum(counters["graph_break"].values())),
           "frames_compiled": int(frames["ok"]), "fallbacks": int(frames["total"] - frames["ok"])}
    return {k: v - (since or {}).get(k, 0) for k, v in now.items()}


# torch.compile modes whose graphs run as CUDA graphs: a replay writes its outputs into the same memory
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


def detached_copy(x):
    """A step output the caller may keep past the next step: a tensor cloned off the graph's memory
    (a CUDA-graph replay overwrites its outputs in place); numbers and None as they are."""
    return x.detach().clone() if torch.is_tensor(x) else x


FALLBACK_WARNING = ("kith: warning: torch.compile gave up on {n} frame(s) of the training step, which now "
                    "run eagerly (slower); TORCH_LOGS=recompiles,graph_breaks says why")


def graph_backend(device: torch.device) -> CudaGraphs:
    """What captures and replays the step under `train.cuda_graph` (the tests put `ReplayCheck`, the CPU
    stand-in, here)."""
    if device.type != "cuda":
        raise UserError(f"train.cuda_graph=true needs a CUDA device (this run is on {device.type}); "
                        "set it to false")
    return CudaGraphs(device)


def cuda_graph_refusal(t: DictConfig, device: torch.device, world: int) -> str | None:
    """Why `train.cuda_graph=true` cannot run with these settings (one line), or None."""
    if world > 1:
        return ("train.cuda_graph=true runs on one process for now (DDP's gradient hooks are not captured); "
                "set it to false under torchrun")
    if resolve_precision(t.precision, device) == torch.float16:
        return ("train.cuda_graph=true cannot capture fp16 loss scaling (its inf check reads the device); "
                "use train.precision=bf16")
    if t.optimizer == "adamw":
        return "train.cuda_graph=true supports train.optimizer=lars or sgd, not adamw"
    if t.online_linear:
        return "train.cuda_graph=true does not capture train.online_linear; turn one of them off"
    if t.compile and t.compile_mode in CUDA_GRAPH_MODES:
        return (f"train.compile_mode={t.compile_mode} makes CUDA graphs itself; with train.cuda_graph=true "
                "use compile_mode=default (or max-autotune-no-cudagraphs)")
    return None


def batch_images(batch: Batch) -> dict[str, torch.Tensor]:
    """The uint8 image tensors a batch's views are made from, named: a resident batch's images, or a
    streamed batch's cut crops (`views.i`, `extra.i`; its images are its first view's crops)."""
    if batch.views is None:
        return {"images": batch.images}
    return {**{f"views.{i}": v for i, v in enumerate(batch.views)},
            **{f"extra.{i}": v for i, v in enumerate(batch.extra or [])}}


def with_images(batch: Batch, tensors: dict[str, torch.Tensor]) -> Batch:
    """`batch` with its image tensors taken from `tensors` (named as `batch_images` names them)."""
    if batch.views is None:
        return dataclasses.replace(batch, images=tensors["images"])
    views = [tensors[f"views.{i}"] for i in range(len(batch.views))]
    extra = None if batch.extra is None else [tensors[f"extra.{i}"] for i in range(len(batch.extra))]
    return dataclasses.replace(batch, images=views[0], views=views, extra=extra)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class TrainStep:
    """One training step, shared by `run_training` and `kith bench` so both time the same code.

    Owns what a step touches: the method (moved to channels_last when asked), the model the step calls
    (the method, DDP-wrapped under torchrun, then compiled with `train.compile`: DDP first, so
    the compiler sees DDP's bucket boundaries), the augmentations, optimizer, grad scaler and
    schedule. `views` makes a batch's augmented views, `optimize` does forward (autocast), backward,
    optimizer and EMA update on given views; `__call__` is both. Nothing in a step reads a device
    value on the host: the loss and metrics are returned as tensors (with fp16 the grad scaler's
    inf check is the one exception, inherent to loss scaling).
    """

    def __init__(self, cfg: DictConfig, method: Method, device: torch.device, steps_per_epoch: int,
                 rank: int = 0, world: int = 1):
        t = cfg.train
        self.cfg, self.device, self.rank = cfg, device, rank
        self.steps_per_epoch = steps_per_epoch
        self.total_steps = steps_per_epoch * t.epochs
        self.warmup_steps = int(t.warmup_epochs * steps_per_epoch)
        self.grad_clip = t.grad_clip
        method = method.to(device)
        self.channels_last = use_channels_last(t.channels_last, device, method)
        use_cudnn_benchmark(t.cudnn_benchmark, device)
        if self.channels_last:
            method = method.to(memory_format=torch.channels_last)
        if world > 1 and t.sync_bn and device.type == "cuda":  # SyncBatchNorm is GPU-only
            method = sync_batchnorm(method, t.sync_bn_momentum)
        self.method = method
        model = wrap_distributed(method) if world > 1 else method
        self.compiled = bool(t.compile)
        # CUDA graphs (inductor's reduce-overhead / max-autotune): what the loop keeps is cloned
        self.cuda_graphs = self.compiled and t.compile_mode in CUDA_GRAPH_MODES
        self.compile_base = compile_stats() if self.compiled else {}
        if self.compiled:
            model = torch.compile(model, mode=None if t.compile_mode == "default" else t.compile_mode,
                                  backend=t.compile_backend)
        self.model = model
        spec = image_spec(cfg.data)
        # the global views, then the extra crops grouped by size (one tensor, one forward, per size)
        self.plan = ViewPlan.of(cfg.augment, method.views, method.extra_views, spec.size)
        self.augments = {name: BatchAugment(cfg.augment[name], spec) for name in self.plan.names}
        self.amp_dtype = resolve_precision(t.precision, device)
        self.seed = int(cfg.seed)
        # data.augment_rng=device: one generator on the device, reseeded every step (no copy of the draws)
        self.augment_gen = torch.Generator(device=device) if cfg.data.augment_rng == "device" else None
        # train.cuda_graph with device draws: the graph makes the views from the batch's uint8 images
        self.augment_in_graph = bool(t.cuda_graph) and self.augment_gen is not None
        for augment in self.augments.values():
            if self.channels_last and self.amp_dtype is not None:  # what the first convolution reads
                augment.write_views_as(self.amp_dtype, torch.channels_last)
            if t.compile_augment:
                augment.compile(t.compile_backend)
            if self.augment_in_graph:  # shapes that do not follow the draws
                augment.whole_batch = True
        self.graph: GraphedStep | None = None  # train.cuda_graph
        if t.cuda_graph:
            refusal = cuda_graph_refusal(t, device, world)
            if refusal:
                raise UserError(refusal)
            self.graph = GraphedStep(graph_backend(device), self._graph_state,
                                     generators=[self.augment_gen] if self.augment_in_graph else [])
            self.ema_weight = torch.zeros((), device=device)  # 1 - τ, filled before each replay
        self.optimizer = build_optimizer(method, cfg, lr_device=device if self.graph else None)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp_dtype == torch.float16)
        self.compile_s: float | None = None  # wall time of the first (compiling) step
        self.online = None  # train.online_linear's OnlineLinear, set by `kith.train.setup`
        self.compile_first: dict[str, int] | None = None  # the counters after the first compiled step
        self.fallback_warned = False

    def compile_report(self) -> dict[str, int]:
        """This trainer's compile counters so far ({} without `train.compile`): `compiled_graphs`,
        `graph_breaks` and `fallbacks` since it was built, and `recompiles`: frames compiled again after
        its first step (0 when every later step reused the first step's graphs)."""
        if not self.compiled:
            return {}
        stats = compile_stats(self.compile_base)
        first = self.compile_first or compile_stats()
        return {"compiled_graphs": stats["compiled_graphs"], "graph_breaks": stats["graph_breaks"],
                "recompiles": compile_stats(first)["frames_compiled"], "fallbacks": stats["fallbacks"]}

    def _check_fallback(self) -> None:
        """One line on stderr (rank 0), once, when dynamo has given up on a frame of the step."""
        fallbacks = compile_stats(self.compile_base)["fallbacks"]
        if fallbacks and not self.fallback_warned:
            self.fallback_warned = True
            if self.rank == 0:
                print(FALLBACK_WARNING.format(n=fallbacks), file=sys.stderr, flush=True)

    def augment_generator(self, step: int) -> torch.Generator:
        """The generator of step `step`'s augmentation: a new CPU one (data.augment_rng=cpu) or the
        device's, reseeded; the same (seed, step, rank) seed either way."""
        if self.augment_gen is None:
            return rng.generator("augment", self.seed, step, self.rank)
        return rng.reseed(self.augment_gen, "augment", self.seed, step, self.rank)

    def views(self, batch: Batch, step: int) -> list[torch.Tensor]:
        return make_views(batch, self.augments, self.plan, self.augment_generator(step))

    def forward(self, views: list[torch.Tensor], batch: Batch, step: int,
                model: torch.nn.Module | None = None, info: StepInfo | None = None
                ) -> tuple[torch.Tensor, dict]:
        """The method's loss and metrics on `views` under the step's autocast and memory format
        (`model`: e.g. the eager method instead of the compiled one; `info`: the step's, inputs made)."""
        if self.channels_last:
            views = [v.contiguous(memory_format=torch.channels_last) for v in views]
        if self.cuda_graphs and model is None:
            torch.compiler.cudagraph_mark_step_begin()  # a new step: the last one's graph outputs may go
        if info is None:
            info = StepInfo(step, self.steps_per_epoch)
            info.inputs = self.method.step_inputs(batch, info)  # eager: outside the compiled graph
        amp = self.amp_dtype
        # a captured graph may not keep autocast's cache of cast weights (torch.cuda.graphs' rule)
        with torch.autocast(self.device.type, dtype=amp or torch.float32, enabled=amp is not None,
                            cache_enabled=False if info.graphed else None):
            return (model or self.model)(views, batch, info)

    def _graph_state(self):
        """What a replay updates in place: the method's parameters and buffers (queues, banks, EMA
        networks), the optimizer's state and learning rates, the EMA weight."""
        yield from self.method.parameters()
        yield from self.method.buffers()
        for state in self.optimizer.state.values():
            yield from (v for v in state.values() if torch.is_tensor(v))
        yield from (g["lr"] for g in self.optimizer.param_groups if torch.is_tensor(g["lr"]))
        yield self.ema_weight

    def _graphed_step(self, views: list[torch.Tensor] | None, batch: Batch, step: int
                      ) -> tuple[torch.Tensor, dict, float | None]:
        """`optimize` under train.cuda_graph: the host work (step inputs, the EMA weight, the augmentation
        generator's seed) eagerly, then forward to EMA update (views None: augmentation to EMA update) as
        one replay of the graph for this step's key."""
        info = StepInfo(step, self.steps_per_epoch, graphed=True)
        inputs = {k: to_device(v, self.device) for k, v in self.method.step_inputs(batch, info).items()}
        tau = self.method.momentum_tau(step)
        if tau is not None:
            self.ema_weight.fill_(1 - tau)
        tensors = {"labels": batch.labels, "indices": batch.indices,
                   **{f"input.{k}": v for k, v in inputs.items()}}
        augment_inside = views is None
        if augment_inside:
            tensors.update(batch_images(batch))
            self.augment_generator(step)  # a replay draws from the seed the generator has now

        def body(views: list[torch.Tensor], tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
            inside = StepInfo(step, self.steps_per_epoch, graphed=True,
                              inputs={k[6:]: v for k, v in tensors.items() if k.startswith("input.")})
            static = dataclasses.replace(batch, labels=tensors["labels"], indices=tensors["indices"])
            if augment_inside:
                static = with_images(static, tensors)
                views = make_views(static, self.augments, self.plan, self.augment_gen)
            loss, metrics = self.forward(views, static, step, info=inside)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.method.parameters(), self.grad_clip, foreach=True)
            self.optimizer.step()
            self.method.after_step()
            if tau is not None:
                self.method.lerp_momentum(self.ema_weight)
            return loss.detach(), metrics

        loss, metrics = self.graph(self.method.graph_key(), tensors, body, views or [])
        return loss, metrics, tau

    def optimize(self, views: list[torch.Tensor] | None, batch: Batch, step: int
                 ) -> tuple[torch.Tensor, dict, float | None]:
        """One optimizer step on `views` (None: made inside the CUDA graph, `augment_in_graph`); returns
        (loss tensor, metrics, EMA τ or None)."""
        first_compile = self.compiled and self.compile_s is None
        if first_compile:
            _sync(self.device)
            tic = time.perf_counter()
        factor = lr_factor(step, self.total_steps, self.warmup_steps)
        set_lr(self.optimizer, factor)  # floats, or device tensors filled: nothing read from the device
        if self.graph is not None:
            loss, metrics, tau = self._graphed_step(views, batch, step)
        else:
            loss, metrics, tau = self._eager_step(views, batch, step, factor)
        if first_compile:
            _sync(self.device)
            self.compile_s = time.perf_counter() - tic
            self.compile_first = compile_stats()
        if self.compiled:
            self._check_fallback()  # a few dict reads: nothing from the device
        if self.cuda_graphs or self.graph is not None:  # the loop keeps them past the next replay
            return detached_copy(loss), {k: detached_copy(v) for k, v in metrics.items()}, tau
        return loss.detach(), metrics, tau

    def _eager_step(self, views: list[torch.Tensor], batch: Batch, step: int, factor: float
                    ) -> tuple[torch.Tensor, dict, float | None]:
        """forward, backward, optimizer, queue pushes and EMA update, op by op."""
        if self.online is not None:
            self.online.begin()
        loss, metrics = self.forward(views, batch, step)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.method.parameters(), self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.method.after_step()  # deferred state updates (queue pushes), now that backward is done
        tau = self.method.update_momentum(step)
        if self.online is not None:  # on the features the step's forward kept, detached: after the backward
            metrics = {**metrics, **self.online.step(batch.labels, factor)}
        return loss, metrics, tau

    def __call__(self, batch: Batch, step: int) -> tuple[torch.Tensor, dict, float | None]:
        if self.augment_in_graph:
            return self.optimize(None, batch, step)
        return self.optimize(self.views(batch, step), batch, step)
