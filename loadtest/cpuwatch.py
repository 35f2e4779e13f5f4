"""How much of the machine's CPU went to *other* processes during a benchmark (Linux ``/proc``).

A shared machine changes benchmark numbers; this says by how much it was shared. ``CpuWatch``
reads the machine's busy time (``/proc/stat``) and the CPU time of this process and all its
descendants (``/proc/<pid>/stat``: utime + stime, plus cutime + cstime of reaped children) at
``start()`` and ``stop()``::

    external_cpu_share = (machine busy - ours) / (wall seconds * cores)     0 = nobody else ran

``wait_quiet`` waits (bounded) until other processes use at most a given share. Where ``/proc``
is missing (not Linux) every figure is ``None`` and nothing waits.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

PROC = Path("/proc")
TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _machine_busy_s() -> float | None:
    try:
        fields = (PROC / "stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return None
    vals = [int(x) for x in fields]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)  # idle + iowait
    steal = vals[7] if len(vals) > 7 else 0
    return (sum(vals[:8]) - idle - steal) / TICK


def _proc_stat(pid: int) -> tuple[int, float] | None:
    """(parent pid, CPU seconds incl. reaped children) of one process, None if it is gone."""
    try:
        raw = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    rest = raw[raw.rindex(")") + 2:].split()  # fields after "(comm)"; rest[0] is the state
    ppid = int(rest[1])
    utime, stime, cutime, cstime = (int(x) for x in rest[11:15])
    return ppid, (utime + stime + cutime + cstime) / TICK


def process_table() -> dict[int, tuple[int, float]]:
    """{pid: (parent pid, CPU seconds)} of every process ({} without /proc)."""
    stats: dict[int, tuple[int, float]] = {}
    if PROC.is_dir():
        for entry in PROC.iterdir():
            if entry.name.isdigit():
                st = _proc_stat(int(entry.name))
                if st is not None:
                    stats[int(entry.name)] = st
    return stats


def tree(root: int, table: dict[int, tuple[int, float]] | None = None) -> list[int]:
    """``root`` and its live descendants."""
    table = process_table() if table is None else table
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        if pid in table:
            out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


def own_tree_cpu_s(root: int | None = None) -> float | None:
    """CPU seconds of ``root`` (default: this process) and every live descendant."""
    if not PROC.is_dir():
        return None
    table = process_table()
    return sum(table[p][1] for p in tree(os.getpid() if root is None else root, table))


class CpuWatch:
    """``start()``, run something, ``stop()`` -> CPU shares of this process tree and of the rest."""

    def __init__(self) -> None:
        self._t0 = 0.0
        self._busy0: float | None = None
        self._own0: float | None = None

    def start(self) -> None:
        self._t0, self._busy0, self._own0 = time.monotonic(), _machine_busy_s(), own_tree_cpu_s()

    def stop(self) -> dict[str, float | None]:
        wall = time.monotonic() - self._t0
        busy, own = _machine_busy_s(), own_tree_cpu_s()
        cores = os.cpu_count() or 1
        if None in (busy, own, self._busy0, self._own0) or wall <= 0:
            return {"wall_s": round(wall, 1), "own_cpu_share": None, "external_cpu_share": None}
        d_busy, d_own = busy - self._busy0, own - self._own0  # type: ignore[operator]
        return {"wall_s": round(wall, 1), "cores": cores,
                "own_cpu_share": round(max(0.0, d_own) / (wall * cores), 3),
                "external_cpu_share": round(max(0.0, d_busy - d_own) / (wall * cores), 3)}


async def wait_quiet(max_share: float, max_wait_s: float, window_s: float = 5.0) -> dict[str, float | None]:
    """Wait until other processes used at most ``max_share`` of the CPU over one ``window_s``.

    Gives up after ``max_wait_s`` (the benchmark then runs anyway and says so).
    """
    waited, last = 0.0, None
    while True:
        w = CpuWatch()
        w.start()
        await asyncio.sleep(window_s)  # a measurement window, not synchronisation
        last = w.stop()["external_cpu_share"]
        waited += window_s
        if last is None or last <= max_share or waited >= max_wait_s:
            return {"waited_s": waited, "external_cpu_share": last,
                    "quiet": last is not None and last <= max_share}
