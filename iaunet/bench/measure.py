"""Measurement helpers of the benchmark scripts (``tools/benchmark.py``): peak memory per call,
interleaved timing of several models, torch.profiler tables.

Peak memory per call: CPU RSS high-water mark (``/proc/self/status`` VmHWM, reset through
``/proc/self/clear_refs`` before each call, freed heap returned by ``malloc_trim`` first), reported
as the process peak and as the increase over the RSS before the call; on CUDA
``torch.cuda.max_memory_allocated``.
"""

import contextlib
import ctypes
import gc
import resource
import statistics
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch


def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


_LIBC = _libc()


def status_kb(field: str, pid: "int | str" = "self") -> Optional[int]:
    """A memory field (``VmRSS``, ``VmHWM``) of process ``pid`` from Linux's ``/proc/<pid>/status``,
    in kB; None where there is none (another OS, a process that has exited). The one reader of it
    (the benchmark tools sample other processes with it)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_mb(pid: "int | str" = "self") -> Optional[float]:
    """Resident memory of process ``pid`` now, in MB (None where unknown)."""
    kb = status_kb("VmRSS", pid)
    return None if kb is None else kb / 1024


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


class PeakMemory:
    """Peak memory of the code in its ``with`` block: CPU RSS (MB) and, on CUDA, allocated tensor
    memory (MB)."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        self.rss_peak_mb = self.rss_increase_mb = self.cuda_peak_mb = self.cuda_increase_mb = None
        self.per_call = False

    def __enter__(self):
        gc.collect()
        if _LIBC is not None:
            _LIBC.malloc_trim(
                0
            )  # give freed heap back, so the baseline RSS is what is really in use
        self._base = status_kb("VmRSS")
        self.per_call = self._base is not None and _reset_peak_rss()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._cuda_base = torch.cuda.memory_allocated()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
            self.cuda_peak_mb, self.cuda_increase_mb = (
                peak / 2**20,
                (peak - self._cuda_base) / 2**20,
            )
        if self.per_call:
            peak_kb = status_kb("VmHWM")
            self.rss_peak_mb, self.rss_increase_mb = peak_kb / 1024, (peak_kb - self._base) / 1024
        else:  # process-lifetime high-water mark (Linux reports KiB)
            self.rss_peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return False


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def autocast(device: str, amp: bool):
    if not amp:
        return contextlib.nullcontext()
    dtype = torch.float16 if device.startswith("cuda") else torch.bfloat16
    return torch.autocast(device_type=device.split(":")[0], dtype=dtype)


def _summary(times: List[float], memory: List[PeakMemory]) -> Dict:
    def peak(attr):
        values = [getattr(m, attr) for m in memory if getattr(m, attr) is not None]
        return round(max(values), 1) if values else None

    return {
        "median_s": statistics.median(times),
        "p90_s": float(np.percentile(times, 90)),
        "mean_s": statistics.fmean(times),
        "min_s": min(times),
        "times_s": times,
        "peak_rss_mb": peak("rss_peak_mb"),
        "peak_rss_increase_mb": peak("rss_increase_mb"),
        "cuda_max_allocated_mb": peak("cuda_peak_mb"),
        "cuda_peak_increase_mb": peak("cuda_increase_mb"),
    }


def interleaved(
    models: Sequence,
    call: Callable[[Any], Dict],
    runs: int,
    warmup: int,
    device: str,
    on_call=None,
) -> Dict[str, Dict]:
    """Warm each model up, then time ``call`` run by run, alternating the models (and their order)
    within each run."""
    for bench in models:
        for _ in range(warmup):
            call(bench)
    times = {b.name: [] for b in models}
    cpu = {b.name: [] for b in models}  # process CPU time: the work, whatever else runs
    memory = {b.name: [] for b in models}
    for r in range(runs):
        for bench in models if r % 2 == 0 else models[::-1]:
            with PeakMemory(device) as mem:
                sync(device)
                start, cpu_start = time.perf_counter(), time.process_time()
                out = call(bench)
                sync(device)
                elapsed = time.perf_counter() - start
            times[bench.name].append(elapsed)
            cpu[bench.name].append(time.process_time() - cpu_start)
            memory[bench.name].append(mem)
            if on_call is not None:
                on_call(bench, out)
    return {
        name: {**_summary(times[name], memory[name]), "cpu_median_s": statistics.median(cpu[name])}
        for name in times
    }


def module_ranges(model: torch.nn.Module) -> List:
    """Label the forward of the model's direct children as profiler ranges ``module::<name>``;
    returns the hooks."""
    handles = []
    for name, child in model.named_children():
        stack = []

        def pre(_m, _args, name=name, stack=stack):
            ctx = torch.profiler.record_function(f"module::{name}")
            ctx.__enter__()
            stack.append(ctx)

        def post(_m, _args, _out, stack=stack):
            stack.pop().__exit__(None, None, None)

        handles += [child.register_forward_pre_hook(pre), child.register_forward_hook(post)]
    return handles


def profile_table(prof, top: int) -> Dict:
    """Top ops by self CPU time and the labelled ranges of a ``torch.profiler`` run."""
    events = prof.key_averages()
    ranges = [e for e in events if e.key.startswith(("module::", "train::", "iaunet::"))]
    ops = sorted(
        (e for e in events if e not in ranges), key=lambda e: e.self_cpu_time_total, reverse=True
    )
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    ranges.sort(key=lambda e: e.cpu_time_total, reverse=True)
    return {
        "total_self_cpu_ms": total / 1e3,
        "top_ops": [
            {
                "op": e.key,
                "self_cpu_ms": e.self_cpu_time_total / 1e3,
                "share": e.self_cpu_time_total / total,
                "calls": e.count,
            }
            for e in ops[:top]
        ],
        "ranges": [
            {"range": e.key, "cpu_ms": e.cpu_time_total / 1e3, "calls": e.count} for e in ranges
        ],
    }
