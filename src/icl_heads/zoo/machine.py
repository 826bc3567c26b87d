"""The machine a zoo model was trained on, as its meta records it: what decides CPU float rounding
(:func:`cpu_kernels`; a retrain is bit-identical only where it matches) and the CPU seconds a run took."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import torch

CPU_CLOCK = "cpu_clock.json"  # CPU seconds of a training run (time_to_quality.py and zoo train write it)


def cpu_vendor() -> str:
    """The CPU vendor (``GenuineIntel``, ``AuthenticAMD``): MKL takes other code paths on each, so the
    same AVX512 kernels round differently (measured: the smoke run's first E1 CI bound differs at 4e-4)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("vendor_id"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_kernels() -> str:
    """What decides CPU float rounding: architecture, the kernels torch dispatches (e.g. AVX512), the
    CPU vendor and the torch version. A retrain is bit-identical only where this matches the model's record."""
    return f"{platform.machine()} {torch.backends.cpu.get_cpu_capability()} {cpu_vendor()} torch {torch.__version__}"


def machine() -> str:
    return f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cores, torch {torch.__version__}".strip()



def cpu_seconds(folder: Path) -> float:
    """The CPU seconds recorded in ``folder``'s :data:`CPU_CLOCK` (0 where none is): they add up over resumed
    calls, since the wall clock of a niced job says little."""
    clock = Path(folder) / CPU_CLOCK
    return float(json.loads(clock.read_text())["cpu_s"]) if clock.exists() else 0.0
