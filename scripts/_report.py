"""What every benchmark/report script here does at its end: name the CPU it
ran on, give repeated measurements as median and spread, print its Markdown
and write it where ``--out`` says."""
from __future__ import annotations

import os
import platform
import statistics
from pathlib import Path


def cpu_name() -> str:
    """The processor's model name (from /proc/cpuinfo where there is one)."""
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def emit(lines, out=None) -> str:
    """Join ``lines`` into one Markdown text, print it, and write it to ``out``."""
    text = "\n".join(lines) + "\n"
    print(text)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text)
    return text


def spread(values, fmt="{:.4f}", unit: str = "") -> tuple:
    """(median, 'min-max') of ``values`` as text; ``fmt`` a format string or
    a function of one float."""
    f = fmt.format if isinstance(fmt, str) else fmt
    med = statistics.median(values)
    return f(med) + unit, f"{f(min(values))}{unit}-{f(max(values))}{unit}"
