"""What every benchmark records about the machine, and how it writes results."""

from __future__ import annotations

import datetime as dt
import os
import platform
from pathlib import Path
from typing import Any, Optional

from lvmzoo.io import atomic_write_text


def hardware() -> dict[str, Any]:
    """CPU model, cores, RAM, OS, Python, the date and the load average of this run."""
    cpu, ram_gib = platform.processor() or "unknown", None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                ram_gib = round(int(line.split()[1]) / 2**20, 1)
                break
    except OSError:  # not Linux: keep what platform knows
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gib": ram_gib,
        "os": platform.platform(),
        "python": platform.python_version(),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "load_average_at_start": load_average(),
    }


def load_average() -> Optional[list[float]]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def write_text(path: Path, text: str) -> None:
    """Atomic write: readers see the old file or the new one, never half of one."""
    atomic_write_text(path, text)
