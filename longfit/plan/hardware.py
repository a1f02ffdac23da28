"""Hardware profiles: named presets with public figures, YAML/JSON profile files, and the saved calibration.

``--hardware`` takes ``this`` (the profile ``longfit plan --calibrate`` saved to ``$LONGFIT_CACHE_DIR/hardware.json``,
default ``~/.cache/longfit/hardware.json``), a preset name (``list_presets()``), or a path to a ``.json``/``.yaml``
file. Preset figures are peak numbers with no engine overheads, so planned times are lower bounds; a calibration
measures reachable figures and longfit's per-step decode overheads, which make decode times estimates.
No torch here.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any

from longfit.config import parse_bytes
from longfit.plan.cost_model import HardwareProfile

GB, TFLOPS, GIB = 1e9, 1e12, 2**30

# Device↔host links: NVIDIA data sheets quote PCIe bandwidth bidirectionally (Gen4 x16 "64 GB/s", Gen5 "128 GB/s");
# one direction is half. A PCIe 4.0 x4 link (16 GT/s · 4 lanes · 128/130 ≈ 7.88 GB/s) caps any NVMe drive on it,
# so it is the disk figure of the server presets (a lower bound on swap time, not a drive's datasheet number).
_PCIE4_X16, _PCIE5_X16, _NVME_PCIE4_X4 = 32 * GB, 64 * GB, 7.88 * GB

# AVX-512 server core (Sapphire/Emerald Rapids class with AVX512_BF16, AMX not used): two 512-bit FMA ports per
# core. VDPBF16PS does 16 fp32 lanes × 2 bf16 products per port per cycle → 128 FLOP/cycle; fp32 FMA 64 FLOP/cycle
# (Intel optimization manual throughputs), at an assumed 3.0 GHz all-core clock. DRAM: Intel ARK lists 8 channels of
# DDR5-5600 per Emerald Rapids socket (8 · 5600 MT/s · 8 B = 358.4 GB/s); a few cores cannot pull that, so a core
# count gets min(cores · 20 GB/s, socket) — 20 GB/s per core is the project machine's measured 35–40 GB/s on 2 cores.
_XEON_CLOCK_HZ, _XEON_CORE_BW, _XEON_SOCKET_BW = 3.0e9, 20 * GB, 358.4 * GB


def _xeon(cores: int) -> HardwareProfile:
    return HardwareProfile(
        name=f"xeon-avx512-{cores}c", kind="cpu",
        memory_bandwidth=min(cores * _XEON_CORE_BW, _XEON_SOCKET_BW),
        bf16_flops=cores * 128 * _XEON_CLOCK_HZ, fp32_flops=cores * 64 * _XEON_CLOCK_HZ,
        memory_bytes=None, host_link_bandwidth=None,
        disk_read_bandwidth=_NVME_PCIE4_X4, disk_write_bandwidth=_NVME_PCIE4_X4,
        source=(f"{cores} AVX-512-BF16 server cores: ISA peak 128 bf16 / 64 fp32 FLOP per cycle per core at 3.0 GHz; "
                "bandwidth min(20 GB/s per core measured, 358.4 GB/s socket from Intel ARK 8x DDR5-5600); "
                "disk = PCIe 4.0 x4 link"),
    )


def _gpu(name: str, bandwidth: float, bf16: float, fp32: float, memory: int, link: float, source: str) -> HardwareProfile:
    return HardwareProfile(name=name, kind="gpu", memory_bandwidth=bandwidth, bf16_flops=bf16, fp32_flops=fp32,
                           memory_bytes=memory, host_link_bandwidth=link, disk_read_bandwidth=_NVME_PCIE4_X4,
                           disk_write_bandwidth=_NVME_PCIE4_X4, source=source + "; disk = PCIe 4.0 x4 link")


_PRESETS: dict[str, HardwareProfile] = {p.name: p for p in [
    *(_xeon(cores) for cores in (2, 4, 8, 16, 32, 64)),
    # NVIDIA data sheets; bf16 is the dense Tensor Core figure (the sheets' headline numbers assume 2:4 sparsity,
    # twice these). Capacities are the nominal binary sizes; usable memory is a little lower (ECC, CUDA context).
    _gpu("a100-40gb", 1555 * GB, 312 * TFLOPS, 19.5 * TFLOPS, 40 * GIB, _PCIE4_X16,
         "NVIDIA A100 data sheet (SXM4 40GB): HBM2 1,555 GB/s, BF16 Tensor 312 TFLOPS dense, FP32 19.5 TFLOPS, "
         "PCIe Gen4 64 GB/s bidirectional"),
    _gpu("a100-80gb", 2039 * GB, 312 * TFLOPS, 19.5 * TFLOPS, 80 * GIB, _PCIE4_X16,
         "NVIDIA A100 data sheet (SXM4 80GB): HBM2e 2,039 GB/s, BF16 Tensor 312 TFLOPS dense, FP32 19.5 TFLOPS, "
         "PCIe Gen4 64 GB/s bidirectional"),
    _gpu("h100-80gb-sxm", 3350 * GB, 989.5 * TFLOPS, 67 * TFLOPS, 80 * GIB, _PCIE5_X16,
         "NVIDIA H100 data sheet (SXM5 80GB): HBM3 3.35 TB/s, BF16 Tensor 1,979 TFLOPS with sparsity = 989.5 dense, "
         "FP32 67 TFLOPS, PCIe Gen5 128 GB/s bidirectional"),
    _gpu("l4", 300 * GB, 121 * TFLOPS, 30.3 * TFLOPS, 24 * GIB, _PCIE4_X16,
         "NVIDIA L4 data sheet: GDDR6 300 GB/s, BF16 Tensor 242 TFLOPS with sparsity = 121 dense, FP32 30.3 TFLOPS, "
         "PCIe Gen4 x16 64 GB/s bidirectional"),
    _gpu("rtx-4090", 1008 * GB, 165.2 * TFLOPS, 82.6 * TFLOPS, 24 * GIB, _PCIE4_X16,
         "NVIDIA Ada Lovelace architecture whitepaper (GeForce RTX 4090): GDDR6X 1,008 GB/s, BF16 Tensor with FP32 "
         "accumulate 165.2 TFLOPS dense, FP32 82.6 TFLOPS, PCIe 4.0 x16"),
    # Apple publishes unified-memory bandwidth (M2 and M3: 100 GB/s, up to 24 GB) and, for M2, "up to 3.6 TFLOPS" of
    # GPU compute; no separate bf16 rate and no M3 figure (10 GPU cores · 128 ALUs · 2 FLOP · ~1.4 GHz ≈ 3.6 TFLOPS).
    HardwareProfile("apple-m2", "unified", 100 * GB, 3.6 * TFLOPS, 3.6 * TFLOPS, memory_bytes=24 * GIB,
                    source="Apple M2 announcement: 100 GB/s unified memory, up to 24 GB, 10-core GPU up to 3.6 TFLOPS "
                           "(used for bf16 and fp32); SSD speed not published"),
    HardwareProfile("apple-m3", "unified", 100 * GB, 3.6 * TFLOPS, 3.6 * TFLOPS, memory_bytes=24 * GIB,
                    source="Apple M3 specifications: 100 GB/s unified memory, up to 24 GB; GPU FLOP/s not published, "
                           "estimated as the M2's 3.6 TFLOPS (10 cores x 128 ALUs x 2 FLOP x ~1.4 GHz)"),
]}


def list_presets() -> list[str]:
    """Preset names: CPUs by core count, then GPUs, then Apple unified memory."""
    return list(_PRESETS)


def get_preset(name: str) -> HardwareProfile:
    """The preset called ``name``. Raises ValueError listing the presets."""
    key = name.strip().lower()
    if key not in _PRESETS:
        raise ValueError(f"hardware must be 'this', a profile file (.json/.yaml) or one of {list_presets()}, "
                         f"got {name!r}")
    return _PRESETS[key]


def cache_dir() -> Path:
    """``$LONGFIT_CACHE_DIR`` if set, else ``~/.cache/longfit``."""
    env = os.environ.get("LONGFIT_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "longfit"


def calibration_path() -> Path:
    return cache_dir() / "hardware.json"


# ---------------------------------------------------------------------------------------------- files
_RATE_UNITS = {"": 1.0, "b/s": 1.0, "kb/s": 1e3, "mb/s": 1e6, "gb/s": 1e9, "tb/s": 1e12,
               "kib/s": 2.0**10, "mib/s": 2.0**20, "gib/s": 2.0**30, "flop/s": 1.0, "flops": 1.0,
               "gflop/s": 1e9, "gflops": 1e9, "tflop/s": 1e12, "tflops": 1e12}
_RATE_FIELDS = ("memory_bandwidth", "bf16_flops", "fp32_flops", "host_link_bandwidth", "disk_read_bandwidth",
                "disk_write_bandwidth")
_TIME_UNITS = {"": 1.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}
_TIME_FIELDS = ("step_overhead_s", "step_overhead_per_seq_s", "step_overhead_per_layer_s",
                "step_overhead_per_seq_layer_s")


def _parse_rate(value: Any, field_name: str) -> float | None:
    """A number in base units (bytes/s, FLOP/s) or a string with a unit: ``"38 GB/s"``, ``"0.7 TFLOPS"``."""
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([A-Za-z/]*)\s*", str(value))
    unit = match.group(2).lower() if match else ""
    if not match or unit not in _RATE_UNITS:
        raise ValueError(f"hardware profile field {field_name} must be a number or a rate such as '38 GB/s' or "
                         f"'0.7 TFLOPS', got {value!r}")
    return float(match.group(1)) * _RATE_UNITS[unit]


def _parse_seconds(value: Any, field_name: str) -> Any:
    """A number of seconds or a string with a unit: ``"0.3 ms"``, ``"250 us"``. Other types pass through to
    ``HardwareProfile``'s validation, which names the field."""
    if not isinstance(value, str):
        return value
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([a-zµ]*)\s*", value.lower())
    if not match or match.group(2) not in _TIME_UNITS:
        raise ValueError(f"hardware profile field {field_name} must be a number of seconds or a duration such as "
                         f"'0.3 ms' or '250 us', got {value!r}")
    return float(match.group(1)) * _TIME_UNITS[match.group(2)]


def profile_from_dict(data: dict[str, Any], default_name: str = "custom") -> HardwareProfile:
    """Build a profile from a file's mapping. Unknown keys other than ``measurements`` are rejected."""
    known = {f.name for f in dataclasses.fields(HardwareProfile)}
    extra = set(data) - known - {"measurements"}
    if extra:
        raise ValueError(f"hardware profile has unknown fields {sorted(extra)}; accepted: {sorted(known)}")
    values: dict[str, Any] = {k: v for k, v in data.items() if k in known}
    for name in _RATE_FIELDS:
        if name in values:
            values[name] = _parse_rate(values[name], name)
    for name in _TIME_FIELDS:
        if name in values:
            values[name] = _parse_seconds(values[name], name)
    if values.get("memory_bytes") is not None:
        values["memory_bytes"] = parse_bytes(values["memory_bytes"], "hardware profile field memory_bytes")
    values.setdefault("name", default_name)
    values.setdefault("kind", "cpu")
    for name in ("memory_bandwidth", "bf16_flops", "fp32_flops"):
        if name not in values:
            raise ValueError(f"hardware profile field {name} is required")
    return HardwareProfile(**values)


def profile_to_dict(profile: HardwareProfile) -> dict[str, Any]:
    """Plain mapping in base units (bytes, bytes/s, FLOP/s, seconds), the format ``profile_from_dict`` reads."""
    return dataclasses.asdict(profile)


def load_profile_file(path: str | Path) -> HardwareProfile:
    """Read a ``.json`` or ``.yaml``/``.yml`` profile (YAML needs PyYAML installed)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(f"hardware profile file {str(path)!r} does not exist")
    text = path.read_text()
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml  # lazy: PyYAML is optional, only YAML profiles need it
        except ImportError as exc:
            raise ValueError(f"hardware profile {str(path)!r} is YAML but PyYAML is not installed; "
                             "use a .json profile or `pip install pyyaml`") from exc
        data = yaml.safe_load(text)
    else:
        data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError(f"hardware profile {str(path)!r} must hold a mapping of fields, got {type(data).__name__}")
    return profile_from_dict(data, default_name=path.stem)


def save_profile(profile: HardwareProfile, path: str | Path | None = None,
                 measurements: dict[str, Any] | None = None) -> Path:
    """Write ``profile`` as JSON (default: the calibration path); ``measurements`` keeps the raw runs."""
    target = Path(path) if path is not None else calibration_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    data = profile_to_dict(profile)
    if measurements:
        data["measurements"] = measurements
    target.write_text(json.dumps(data, indent=2) + "\n")
    return target


def resolve_hardware(name: str) -> HardwareProfile:
    """``this`` → saved calibration; an existing path or ``*.json``/``*.yaml`` → that file; else a preset."""
    value = name.strip()
    if value.lower() == "this":
        path = calibration_path()
        if not path.is_file():
            raise ValueError(f"hardware 'this' needs a calibration at {str(path)!r}: run `longfit plan --calibrate` "
                             f"first, or pick a preset from {list_presets()}")
        return load_profile_file(path)
    if value.lower().endswith((".json", ".yaml", ".yml")) or os.path.sep in value or Path(value).is_file():
        return load_profile_file(value)
    return get_preset(value)
