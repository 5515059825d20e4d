"""Helpers shared by the bench scripts: the machine line and atomic JSON output."""
import json
import os
import platform

import torch

import cache


def write_json(path, obj):
    cache.atomic_write(path, json.dumps(obj, indent=1, default=str) + "\n")  # the project's one atomic writer


def machine():
    """CPU model, core count, torch version and GPU (if any): printed at the top of every bench."""
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return dict(cpu_count=os.cpu_count(), cpu=cpu, torch=torch.__version__, python=platform.python_version(),
                gpu=gpu, threads=torch.get_num_threads())
