"""`train.cuda_graph`: the training step from forward to EMA update captured once as a CUDA graph and
replayed every step, so a step costs one launch instead of a thousand or more kernel launches.

A replay re-runs the kernels recorded at capture on the same memory: it reads its inputs from static
buffers (the step's views, or with `data.augment_rng=device` the batch's uint8 images, which the graph
augments itself; labels, indices and the method's `step_inputs`, copied in before each replay),
writes its outputs (loss, metrics) to the same tensors every time, and reads every scalar it was
captured with. So what changes from step to step must be on the device: the learning rate and the
EMA weight are 0-dim tensors filled between replays (`kith.train.optim.set_lr`,
`Method.lerp_momentum`), and a method whose step branches on host state names it in `graph_key`
(one graph per value; SPCL before and after its first clustering).

Each graph key runs `WARMUP_STEPS` eager steps first (on a side stream on CUDA, as
`torch.cuda.graphs` requires: lazy state such as momentum buffers, cuBLAS workspaces and the compiled
kernels of `train.compile` is made there), then captures.

Random draws inside the graph come from generators registered with it (`GraphedStep(generators=...)`):
a replay draws from such a generator's seed and offset at the time of the replay, so reseeding it before
each step (`kith.utils.rng.reseed`) gives the eager step's draws.

`ReplayCheck` is the CPU stand-in the tests use: its "replay" runs the step again and fails when the
step dispatches anything a CUDA graph would not replay faithfully: a different op, a different scalar
argument (a Python float read at capture) or a different persistent tensor (state replaced instead of
updated in place). Its capture also fails on what a CUDA capture refuses or gets wrong: a tensor made
from host values (a synchronising copy), a read of the device on the host (`.item()`, `nonzero`) and a
draw from a generator not registered with the graph.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

WARMUP_STEPS = 3

# ops that turn host data into a tensor (`torch.tensor([...])`): on CUDA the copy of that data to the
# device inside a capture is a synchronising copy from pageable memory, refused by the capture. A 0-dim
# one (a Python number wrapped for an op, e.g. `mask[i] = True`) is passed to the kernel as a value instead
HOST_TENSOR_OPS = frozenset({"aten.lift_fresh.default", "aten.lift_fresh_copy.default"})
# ops that read the device on the host: a value (`.item()`, `if tensor:`) or an output size that follows
# the data (`nonzero`, boolean-mask indexing): a sync, which a CUDA capture refuses
HOST_READ_OPS = frozenset({"aten._local_scalar_dense.default", "aten.nonzero.default",
                           "aten.masked_select.default", "aten._unique2.default", "aten.unique_dim.default",
                           "aten.unique_consecutive.default"})

Body = Callable[[list[torch.Tensor], dict[str, torch.Tensor]], tuple[torch.Tensor, dict]]


class CudaGraphs:
    """Capture and replay with `torch.cuda.CUDAGraph`, every graph in one memory pool."""

    capture_runs = False  # capturing records the kernels without running them: a replay follows

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device)
        self.pool = torch.cuda.graph_pool_handle()

    def eager(self, fn: Callable[[], tuple]) -> tuple:
        current = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(current)
        with torch.cuda.stream(self.stream):
            out = fn()
        current.wait_stream(self.stream)
        return out

    def capture(self, fn: Callable[[], tuple], persistent: Iterable[torch.Tensor],
                generators: Sequence[torch.Generator] = ()) -> tuple[object, tuple]:
        graph = torch.cuda.CUDAGraph()
        for gen in generators:  # a replay then draws from the generator's seed and offset at that time
            graph.register_generator_state(gen)
        torch.cuda.synchronize(self.device)
        with torch.cuda.graph(graph, pool=self.pool):
            out = fn()
        return graph, out

    def replay(self, graph, fn: Callable[[], tuple]) -> None:
        graph.replay()


def _generator_id(gen: torch.Generator) -> int:
    """The generator's identity: its C++ object (an op sees a new Python wrapper of it on every call)."""
    return gen._cdata


def _scalar(x) -> object:
    """A dispatched non-tensor argument as a comparable value (NaN equal to NaN)."""
    if isinstance(x, float) and math.isnan(x):
        return "nan"
    if isinstance(x, torch.Generator):
        return ("generator", _generator_id(x))
    if x is None or isinstance(x, (bool, int, float, str, torch.dtype, torch.device, torch.layout,
                                   torch.memory_format)):
        return x
    return type(x).__name__  # e.g. a profiler record's handle: not an input of the computation


class _Recorder(TorchDispatchMode):
    """Every dispatched op with its non-tensor arguments and, for tensors whose storage is persistent
    (known before the step), that storage's address."""

    def __init__(self, persistent: set[int]):
        super().__init__()
        self.persistent = persistent
        self.ops: list[tuple] = []
        self.from_host: list[int] = []  # positions of ops that made a tensor of host values
        self.host_reads: list[int] = []  # positions of ops that read the device on the host
        self.generators: dict[int, int] = {}  # each generator an op draws from -> the first op drawing

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        leaves, _ = tree_flatten((args, kwargs or {}))
        if str(func) in HOST_TENSOR_OPS and args[0].dim() > 0:
            self.from_host.append(len(self.ops))
        if str(func) in HOST_READ_OPS:
            self.host_reads.append(len(self.ops))
        signature = []
        for leaf in leaves:
            if isinstance(leaf, torch.Tensor):
                ptr = leaf.untyped_storage().data_ptr()
                signature.append(("state", ptr) if ptr in self.persistent else ("tensor", leaf.dtype))
            else:
                if isinstance(leaf, torch.Generator):
                    self.generators.setdefault(_generator_id(leaf), len(self.ops))
                signature.append(_scalar(leaf))
        self.ops.append((str(func), tuple(signature)))
        return func(*args, **(kwargs or {}))


class GraphReplayError(AssertionError):
    """The step dispatched something its captured graph would not have replayed."""


class ReplayCheck:
    """CPU stand-in for `CudaGraphs`: "capture" runs the step and records what it dispatches, "replay"
    runs it again and raises `GraphReplayError` at the first op that differs from the recording."""

    capture_runs = True  # the recording is a real run of the step

    def __init__(self):
        self.captures = 0
        self.replays = 0
        self.recorded: list[list[str]] = []  # each capture's op names, in order

    def eager(self, fn: Callable[[], tuple]) -> tuple:
        return fn()

    def capture(self, fn: Callable[[], tuple], persistent: Iterable[torch.Tensor],
                generators: Sequence[torch.Generator] = ()) -> tuple[object, tuple]:
        self.captures += 1
        ptrs = {t.untyped_storage().data_ptr() for t in persistent}
        recorder = _Recorder(ptrs)
        with recorder:
            out = fn()
        if recorder.from_host:
            raise GraphReplayError(
                f"op {recorder.from_host[0]} of the step makes a tensor from host values (torch.tensor): "
                "under CUDA-graph capture that is a copy from pageable memory, which syncs and fails; "
                "make it once outside the step")
        if recorder.host_reads:
            i = recorder.host_reads[0]
            raise GraphReplayError(f"op {i} of the step ({recorder.ops[i][0]}) reads the device on the host "
                                   "(a value, or an output size that follows the data): a CUDA capture "
                                   "cannot sync; keep shapes fixed and values on the device")
        unregistered = set(recorder.generators) - {_generator_id(g) for g in generators}
        if unregistered:
            raise GraphReplayError(
                f"op {min(recorder.generators[g] for g in unregistered)} of the step draws from a generator "
                "not registered with the graph (a replay would repeat the capture's draws); pass it to "
                "GraphedStep(generators=...) and reseed it between replays")
        self.recorded.append([op for op, _ in recorder.ops])
        return (recorder, out), out

    def replay(self, graph, fn: Callable[[], tuple]) -> None:
        self.replays += 1
        captured, outputs = graph
        recorder = _Recorder(captured.persistent)
        with recorder:
            out = fn()
        for i, (was, now) in enumerate(zip(captured.ops, recorder.ops)):
            if was != now:
                raise GraphReplayError(f"op {i} of the step differs from its capture: {now} vs {was}")
        if len(captured.ops) != len(recorder.ops):
            raise GraphReplayError(f"the step dispatched {len(recorder.ops)} ops, its capture "
                                   f"{len(captured.ops)}")
        _copy_outputs(outputs, out)  # a CUDA graph writes its outputs into the captured tensors


def _copy_outputs(static: tuple, fresh: tuple) -> None:
    """`fresh`'s tensors into `static`'s; a non-tensor output that changed is one a replay would not
    change (a Python number computed from host state), so it fails."""
    static_leaves, _ = tree_flatten(static)
    fresh_leaves, _ = tree_flatten(fresh)
    for s, f in zip(static_leaves, fresh_leaves):
        if isinstance(s, torch.Tensor):
            s.copy_(f)
        elif _scalar(s) != _scalar(f):
            raise GraphReplayError(f"a step output is a host value that changed ({s!r} at capture, now "
                                   f"{f!r}): a replay would return the captured one; make it a tensor")


@dataclass
class _Graph:
    eager_left: int
    graph: object = None
    inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    outputs: tuple | None = None
    run: Callable[[], tuple] | None = None  # the body on the static inputs


class GraphedStep:
    """Runs `body(views, tensors)` (the whole step; `tensors`: labels, indices, step inputs) eagerly for
    the first `WARMUP_STEPS` calls of each key, then as a captured graph on static copies of its inputs.
    Returns the body's (loss, metrics); after a replay those are the graph's own output tensors, which
    the next replay overwrites (the caller clones what it keeps)."""

    def __init__(self, backend: CudaGraphs | ReplayCheck, persistent: Callable[[], Iterable[torch.Tensor]],
                 warmup_steps: int = WARMUP_STEPS, generators: Sequence[torch.Generator] = ()):
        self.backend = backend
        self.persistent = persistent  # the state a replay updates in place: parameters, buffers, optimizer
        self.warmup_steps = warmup_steps
        # generators the step draws from (the augmentation's, with data.augment_rng=device): registered
        # with each graph, reseeded by the caller before each call
        self.generators = tuple(generators)
        self.graphs: dict[tuple, _Graph] = {}

    @staticmethod
    def key(host_key: tuple, tensors: dict[str, torch.Tensor]) -> tuple:
        return (host_key, tuple((name, tuple(t.shape), t.dtype, t.device) for name, t in tensors.items()))

    def __call__(self, host_key: tuple, tensors: dict[str, torch.Tensor], body: Body,
                 views: list[torch.Tensor]) -> tuple[torch.Tensor, dict]:
        named = {**{f"view{i}": v for i, v in enumerate(views)}, **tensors}
        key = self.key(host_key, named)
        entry = self.graphs.setdefault(key, _Graph(self.warmup_steps))
        if entry.eager_left > 0:
            entry.eager_left -= 1
            return self.backend.eager(lambda: body(views, tensors))
        if entry.graph is None:
            entry.inputs = {name: t.clone() for name, t in named.items()}
            static_views = [entry.inputs[f"view{i}"] for i in range(len(views))]
            static_tensors = {name: entry.inputs[name] for name in tensors}
            entry.run = lambda: body(static_views, static_tensors)
            persistent = list(self.persistent()) + list(entry.inputs.values())
            entry.graph, entry.outputs = self.backend.capture(entry.run, persistent, self.generators)
            if self.backend.capture_runs:
                return entry.outputs
        else:
            for name, t in named.items():
                entry.inputs[name].copy_(t)
        self.backend.replay(entry.graph, entry.run)
        return entry.outputs
