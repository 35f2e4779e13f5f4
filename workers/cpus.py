"""CPU lists ("0", "0-3", "0,2-3") and binding the calling thread to one.

Used for the decode worker's KV loader threads (``decode.kv_load_cpus``): on CPU machines the
copy of an imported prompt's KV (tens of MB for a long prompt) otherwise runs on the decode
engine's own core and stretches the decode step it lands in, the stall disaggregation exists to
remove; bound elsewhere (the prefill worker's core, say) it plays the part of a GPU's copy engine.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

from kvrelay.base.logs import get_logger
from kvrelay.schemas.errors import ValidationError

log = get_logger(__name__)
MAX_CPU = 4095


def parse_cpu_list(text: str, path: str = "cpus") -> frozenset[int]:
    """``"0,2-3"`` -> {0, 2, 3}; ``""`` -> empty. Raises ValidationError naming ``path``."""
    out: set[int] = set()
    for part in filter(None, (p.strip() for p in text.split(","))):
        lo, sep, hi = part.partition("-")
        try:
            a, b = int(lo), int(hi) if sep else int(lo)
        except ValueError:
            raise ValidationError(path, f"{part!r} is not a core number or range (e.g. 0, 2-3)") from None
        if not 0 <= a <= b <= MAX_CPU:
            raise ValidationError(path, f"{part!r}: cores must be 0..{MAX_CPU}, low to high")
        out.update(range(a, b + 1))
    return frozenset(out)


def bind_thread(cpus: frozenset[int]) -> None:
    """Bind the calling thread (only it, and threads it starts later) to ``cpus``; a refusal is
    logged and the thread stays where it was."""
    try:
        os.sched_setaffinity(0, cpus)  # 0 = the calling thread on Linux
    except (OSError, ValueError) as exc:
        log.warning("cpu_bind_failed", cpus=sorted(cpus), error=str(exc))


def pool(workers: int, name: str, cpus: frozenset[int] = frozenset()) -> ThreadPoolExecutor:
    """A thread pool whose threads bind themselves to ``cpus`` when they start (empty: unbound)."""
    if not cpus:
        return ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name)
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name, initializer=bind_thread,
                              initargs=(cpus,))
