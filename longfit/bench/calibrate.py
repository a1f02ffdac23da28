"""Measure this machine for the planner: memory bandwidth, bf16/fp32 matmul FLOP/s, disk bandwidth.

``python -m longfit.bench.calibrate`` (what ``longfit plan --calibrate`` runs) writes the ``this`` hardware profile
to ``$LONGFIT_CACHE_DIR/hardware.json`` (default ``~/.cache/longfit``). Every figure is the median of several timed
runs after a warm-up; run it on a quiet machine (one busy foreign process slows 2-thread torch 10–50×).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from longfit.plan.cost_model import HardwareProfile
from longfit.plan.hardware import calibration_path, save_profile


def _median_seconds(fn: Callable[[], object], repeats: int) -> tuple[float, list[float]]:
    fn()  # warm-up: page faults, oneDNN kernel selection
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def measure_bandwidth(num_bytes: int = 1 << 30, repeats: int = 5) -> dict[str, Any]:
    """Read bandwidth (sum of a large fp32 tensor: bytes ÷ time) and copy bandwidth (read + write ÷ time).

    The buffer is much larger than the last-level cache so DRAM, not cache, is measured. Decode streams weights
    and KV read-only, so the planner uses the read figure.
    """
    source = torch.ones(num_bytes // 4, dtype=torch.float32)  # ones(): every page committed before timing
    target = torch.empty_like(source)
    target.copy_(source)
    read_s, read_runs = _median_seconds(lambda: source.sum(), repeats)
    copy_s, copy_runs = _median_seconds(lambda: target.copy_(source), repeats)
    return {"buffer_bytes": source.numel() * 4, "read_bytes_per_s": source.numel() * 4 / read_s,
            "copy_bytes_per_s": 2 * source.numel() * 4 / copy_s, "read_runs_s": read_runs, "copy_runs_s": copy_runs}


def measure_matmul(dtype: torch.dtype, size: int = 2048, repeats: int = 5) -> dict[str, Any]:
    """Square ``[size, size] @ [size, size]`` matmul: ``2 · size³`` FLOPs ÷ median time."""
    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    out = torch.empty(size, size, dtype=dtype)
    seconds, runs = _median_seconds(lambda: torch.matmul(a, b, out=out), repeats)
    return {"size": size, "flops": 2 * size**3 / seconds, "runs_s": runs}


def measure_disk(directory: Path, num_bytes: int = 256 << 20) -> dict[str, Any]:
    """Sequential write (with fsync) and read-back of a temporary file; the page cache is dropped between them
    (``posix_fadvise`` DONTNEED) so the read reaches the disk."""
    block = os.urandom(1 << 20)
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=directory, prefix="calibrate-", delete=False) as handle:
        path = Path(handle.name)
    try:
        start = time.perf_counter()
        with open(path, "wb", buffering=0) as file:
            file.writelines(block for _ in range(num_bytes // len(block)))
            os.fsync(file.fileno())
        write_s = time.perf_counter() - start
        with open(path, "rb", buffering=0) as file:
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(file.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            start = time.perf_counter()
            while file.read(1 << 24):
                pass
            read_s = time.perf_counter() - start
    finally:
        path.unlink(missing_ok=True)
    return {"file_bytes": num_bytes, "write_bytes_per_s": num_bytes / write_s, "read_bytes_per_s": num_bytes / read_s}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _host_memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def calibrate(num_threads: int | None = None, bandwidth_bytes: int = 1 << 30, matmul_size: int = 2048,
              repeats: int = 5, disk: bool = True) -> tuple[HardwareProfile, dict[str, Any]]:
    """Measure this machine; returns the profile and the raw measurements.

    Args:
        num_threads: torch threads for the run; None keeps torch's default (the physical cores).
        bandwidth_bytes: buffer size of the bandwidth test (keep it well above the last-level cache).
        matmul_size: side of the square matmuls.
        repeats: timed runs per figure (the median is kept).
        disk: also time a temporary file in the cache directory.
    """
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    with torch.inference_mode():
        bandwidth = measure_bandwidth(bandwidth_bytes, repeats)
        bf16 = measure_matmul(torch.bfloat16, matmul_size, repeats)
        fp32 = measure_matmul(torch.float32, matmul_size, repeats)
    disk_result = measure_disk(calibration_path().parent) if disk else None
    threads = torch.get_num_threads()
    measurements = {"cpu": _cpu_name(), "num_threads": threads, "torch": torch.__version__,
                    "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "bandwidth": bandwidth, "matmul_bf16": bf16,
                    "matmul_fp32": fp32, "disk": disk_result}
    profile = HardwareProfile(
        name="this", kind="cpu", memory_bandwidth=bandwidth["read_bytes_per_s"], bf16_flops=bf16["flops"],
        fp32_flops=fp32["flops"], memory_bytes=_host_memory_bytes(), host_link_bandwidth=None,
        disk_read_bandwidth=disk_result["read_bytes_per_s"] if disk_result else None,
        disk_write_bandwidth=disk_result["write_bytes_per_s"] if disk_result else None,
        source=f"measured by longfit plan --calibrate on {_cpu_name()} with {threads} threads "
               f"(median of {repeats} runs)", measured=True)
    return profile, measurements


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Measure this machine for `longfit plan --hardware this`.")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's, the physical cores)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per figure; the median is kept")
    parser.add_argument("--bandwidth-mib", type=int, default=1024, help="bandwidth buffer size in MiB")
    parser.add_argument("--matmul-size", type=int, default=2048, help="side of the square matmuls")
    parser.add_argument("--no-disk", action="store_true", help="skip the disk test")
    parser.add_argument("--output", help=f"profile path (default {calibration_path()})")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.bandwidth_mib < 1 or args.matmul_size < 16 or (args.threads or 1) < 1:
        parser.error("--repeats, --bandwidth-mib, --threads must be positive and --matmul-size >= 16")
    profile, measurements = calibrate(args.threads, args.bandwidth_mib << 20, args.matmul_size, args.repeats,
                                      disk=not args.no_disk)
    path = save_profile(profile, args.output, measurements)
    disk = (f", disk read {profile.disk_read_bandwidth / 1e9:.2f} / write {profile.disk_write_bandwidth / 1e9:.2f} GB/s"
            if profile.disk_read_bandwidth and profile.disk_write_bandwidth else "")
    print(f"memory read {profile.memory_bandwidth / 1e9:.1f} GB/s (copy "
          f"{measurements['bandwidth']['copy_bytes_per_s'] / 1e9:.1f}), bf16 {profile.bf16_flops / 1e9:.0f} GFLOP/s, "
          f"fp32 {profile.fp32_flops / 1e9:.0f} GFLOP/s{disk} with {measurements['num_threads']} threads -> {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
