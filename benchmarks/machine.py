"""How busy the machine was while a benchmark timed something, so a timing taken beside other work is flagged.

Every benchmark here compares rates measured in the same run; on a shared machine another process taking a
core skews one side. `others_cpu_s(start)` says how many CPU seconds other processes took since `cpu_snapshot()`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

BUSY_WARNING = 0.10  # share of the machine's CPU other processes may take before a timing is flagged


@dataclass(frozen=True)
class CpuSnapshot:
    machine_s: float  # CPU seconds all cores spent on anything but idling since boot
    own_s: float  # CPU seconds of this process and its finished children


def cpu_snapshot() -> CpuSnapshot:
    return CpuSnapshot(machine_cpu_s(), own_cpu_s())


def others_cpu_s(start: CpuSnapshot) -> float:
    """CPU seconds other processes (and the hypervisor) took since `start`."""
    return max(0.0, (machine_cpu_s() - start.machine_s) - (own_cpu_s() - start.own_s))


def machine_cpu_s() -> float:
    """CPU seconds all cores spent on anything but idling since boot (Linux /proc/stat; 0 elsewhere)."""
    try:
        ticks = [int(field) for field in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return 0.0
    user, nice, system, _idle, _iowait, irq, softirq, steal = ticks
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def own_cpu_s() -> float:
    """CPU seconds of this process and its finished children (e.g. decoding workers, once their pool is shut)."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system
