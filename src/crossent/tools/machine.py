"""One line naming the machine a measurement ran on (benchmarks, ``crossent info``)."""

import os
import platform

import torch

__all__ = ["machine"]


def machine() -> str:
    """One line naming the machine: CPU model and cores, or the GPU; torch version."""
    if torch.cuda.is_available():
        dev = torch.cuda.get_device_name()
    else:
        model = platform.processor() or "cpu"
        try:
            with open("/proc/cpuinfo") as f:
                for line in f:
                    if line.startswith("model name"):
                        model = line.split(":", 1)[1].strip()
                        break
        except OSError:
            pass
        dev = f"{model}, {os.cpu_count()} cores, {torch.backends.cpu.get_cpu_capability()}"
    return f"{dev}; torch {torch.__version__}; python {platform.python_version()}"
