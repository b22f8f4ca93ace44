"""Memory fields of a Linux process, read from /proc (the benches' peak-RSS probes)."""

from __future__ import annotations

import re
from pathlib import Path


def status_kib(field: str, pid: int | str = "self") -> int:
    """``field`` (VmRSS, VmHWM, ...) of /proc/PID/status in KiB; OSError once the process is gone."""
    text = Path(f"/proc/{pid}/status").read_text()
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    if match is None:
        raise OSError(f"/proc/{pid}/status has no {field}")
    return int(match.group(1))
