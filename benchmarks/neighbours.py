"""Neighbour search at scale: `kith.memory.chunked_topk` (what `Queue.neighbours` runs for NNCLR,
All4One and MSF) against the naive `torch.topk(queries @ bank.T, k)` that keeps the whole (B, N)
similarity matrix, in the same run, on banks of 64k, 256k and 1M normalised entries.

    python benchmarks/neighbours.py                       # CPU here, CUDA when visible
    python benchmarks/neighbours.py --device cuda --batches 256 512

Per (bank size N, dim D, query batch B) and variant (naive fp32, chunked fp32 = the default and
exact, chunked bf16 = low-precision candidates re-scored in float32): the median wall time per query
batch over `--repeats` timed calls after one warm-up call, and the peak extra memory of one call
beyond the bank and the queries (CUDA: `torch.cuda.max_memory_allocated`; CPU: the process's peak
resident set, VmHWM after resetting it through /proc/self/clear_refs, minus the resident set before
the call; glibc is told to return every block over 64 KiB to the system on free, so a freed
matrix is not silently reused). Correctness in the same run: whether chunked fp32 returns the
naive indices, and the recall of bf16 against the exact fp32 top-k on the random bank and on
clustered banks (groups of ~64 around random centres, cosine 0.95 or 0.99 to the centre, queries
drawn from the same groups: many near-ties).
Writes benchmarks/results/neighbours.json (or `--out`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kith.memory import chunked_topk
from kith.tools.bench import device_name

DEFAULT_OUT = Path(__file__).parent / "results" / "neighbours.json"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CLUSTER_COS = (0.95, 0.99)  # groups of 64 around a centre: similar images, near-duplicates
_MALLOC_ENV = "MALLOC_MMAP_THRESHOLD_"  # a fixed threshold also turns off glibc's dynamic raising


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_extra_mib(fn, device: torch.device) -> tuple[object, float]:
    """Run `fn()` once; its result and the peak memory it added above what was in use before."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = fn()
        torch.cuda.synchronize(device)
        return out, (torch.cuda.max_memory_allocated(device) - before) / 2**20
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
    before = _rss_kib("VmRSS")
    out = fn()
    return out, (_rss_kib("VmHWM") - before) / 1024


def time_ms(fn, device: torch.device, repeats: int) -> list[float]:
    fn()  # warm-up (kernels, allocator)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        tic = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - tic) * 1e3)
    return times


def recall(idx: torch.Tensor, ref: torch.Tensor) -> float:
    """Fraction of the exact top-k indices (per row, order ignored) that `idx` also returns."""
    hits = (idx[:, :, None] == ref[:, None, :]).any(dim=1)
    return float(hits.float().mean())


def unit(n: int, d: int, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=gen), dim=1).to(device)


def clustered(n: int, d: int, gen: torch.Generator, device: torch.device, cos: float, group: int = 64):
    """`n` unit vectors in groups of ~`group` around random centres, cosine ~`cos` to their centre."""
    centres = F.normalize(torch.randn(max(n // group, 1), d, generator=gen), dim=1)
    noise = ((1 / cos**2 - 1) / d) ** 0.5  # |noise|^2 = 1/cos^2 - 1: cos(x, centre) ~ cos
    assign = torch.randint(0, centres.shape[0], (n,), generator=gen)
    return F.normalize(centres[assign] + noise * torch.randn(n, d, generator=gen), dim=1).to(device)


def naive_topk(queries: torch.Tensor, bank: torch.Tensor, k: int):
    return torch.topk(queries @ bank.T, k, dim=1)


def run_config(n: int, d: int, batches: list[int], k: int, chunk: int, dtypes: list[str], repeats: int,
               device: torch.device, seed: int) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    bank = unit(n, d, gen, device)
    rows = []
    for b in batches:
        queries = unit(b, d, gen, device)
        variants = {"naive_fp32": partial(naive_topk, queries, bank, k)}
        for name in dtypes:
            variants[f"chunked_{name}"] = partial(chunked_topk, queries, bank, k, chunk, DTYPES[name])
        ref_idx = None
        for variant, fn in variants.items():
            (_, idx), peak = peak_extra_mib(fn, device)
            times = time_ms(fn, device, repeats)
            row = {"bank": n, "dim": d, "batch": b, "k": k, "variant": variant,
                   "chunk_size": None if variant.startswith("naive") else chunk,
                   "time_ms": round(statistics.median(times), 3), "times_ms": [round(t, 3) for t in times],
                   "peak_extra_mib": round(peak, 1)}
            if variant == "naive_fp32":
                ref_idx = idx
            elif variant == "chunked_fp32":
                row["same_indices_as_naive"] = bool(torch.equal(idx, ref_idx))
            else:
                row["recall_vs_fp32"] = recall(idx, ref_idx)
                row["top1_agreement"] = float((idx[:, 0] == ref_idx[:, 0]).float().mean())
            rows.append(row)
            print(json.dumps(row), flush=True)
    del bank
    low = [name for name in dtypes if name != "fp32"]
    if low:  # near-ties: where a low-precision search can miss a neighbour
        for cos in CLUSTER_COS:
            points = clustered(n + batches[0], d, gen, device, cos)  # queries from the bank's own groups
            bank, queries = points[:n], points[n:]
            ref_idx = chunked_topk(queries, bank, k, chunk)[1]
            for name in low:
                idx = chunked_topk(queries, bank, k, chunk, DTYPES[name])[1]
                row = {"bank": n, "dim": d, "batch": batches[0], "k": k, "variant": f"chunked_{name}",
                       "data": f"clustered_cos{cos}", "recall_vs_fp32": recall(idx, ref_idx),
                       "top1_agreement": float((idx[:, 0] == ref_idx[:, 0]).float().mean())}
                rows.append(row)
                print(json.dumps(row), flush=True)
            del bank, points
    return rows


def summarise(rows: list[dict]) -> list[dict]:
    """Per (N, D, B): chunked fp32 vs naive, time ratio and memory ratio."""
    out = []
    timed = [r for r in rows if "time_ms" in r]
    for r in timed:
        if r["variant"] != "chunked_fp32":
            continue
        key = (r["bank"], r["dim"], r["batch"])
        same = [x for x in timed if (x["bank"], x["dim"], x["batch"]) == key]
        naive = next(x for x in same if x["variant"] == "naive_fp32")
        entry = {"bank": key[0], "dim": key[1], "batch": key[2],
                 "time_chunked_over_naive": round(r["time_ms"] / naive["time_ms"], 3),
                 "peak_naive_over_chunked": round(naive["peak_extra_mib"] / max(r["peak_extra_mib"], 0.1), 2)}
        for low in same:
            if low["variant"] not in ("naive_fp32", "chunked_fp32"):
                entry[f"time_{low['variant']}_over_chunked_fp32"] = round(low["time_ms"] / r["time_ms"], 3)
        out.append(entry)
    return out


def hardware(device: torch.device) -> dict:
    info = {"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "machine": platform.machine()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    info["cpu"] = device_name(torch.device("cpu"))
    info["cpu_count"] = os.cpu_count()
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--banks", type=int, nargs="+", default=[65536, 262144, 1048576])
    parser.add_argument("--dims", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--batches", type=int, nargs="+", help="default: 256 on CPU, 256 512 on CUDA")
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--k", type=int, default=5, help="neighbours (All4One and MSF use 5)")
    parser.add_argument("--chunk-size", type=int, default=65536, help="chunked_topk's default")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(auto if args.device == "auto" else args.device)
    if device.type == "cpu" and _MALLOC_ENV not in os.environ:  # must be set before the process starts
        os.execve(sys.executable, [sys.executable, str(Path(__file__).resolve()), *sys.argv[1:]],
                  {**os.environ, _MALLOC_ENV: "65536"})
    if args.threads:
        torch.set_num_threads(args.threads)
    if "fp32" not in args.dtypes:
        args.dtypes.insert(0, "fp32")
    batches = args.batches or ([256, 512] if device.type == "cuda" else [256])
    rows = []
    for n in args.banks:
        for d in args.dims:
            rows += run_config(n, d, batches, args.k, args.chunk_size, args.dtypes, args.repeats, device,
                               args.seed)
    result = {"command": " ".join(["python benchmarks/neighbours.py", *sys.argv[1:]]),
              "hardware": hardware(device), "note": __doc__.split("\n\n")[1].replace("\n", " "),
              "summary": summarise(rows), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
