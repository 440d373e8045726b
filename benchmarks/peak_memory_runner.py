"""Runs a Python script as `__main__` (`python peak_memory_runner.py SCRIPT ARGS...`) and, when it exits, writes
its CUDA peak memory (`torch.cuda.max_memory_allocated` and `max_memory_reserved`, bytes) as JSON to the file named
by $PEAK_MEMORY_FILE. The script runs unmodified; benchmark_dpo.py runs both compared trainers through it."""

import atexit
import json
import os
import runpy
import sys


def write_peak_memory():
    import torch

    peak = {"max_memory_allocated": 0, "max_memory_reserved": 0}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        peak = {
            "max_memory_allocated": torch.cuda.max_memory_allocated(),
            "max_memory_reserved": torch.cuda.max_memory_reserved(),
        }
    with open(os.environ["PEAK_MEMORY_FILE"], "w") as file:
        json.dump(peak, file)


if __name__ == "__main__":
    script = sys.argv[1]
    sys.argv = sys.argv[1:]
    sys.path[0] = os.path.dirname(os.path.abspath(script))  # as if the script had been run directly
    if "PEAK_MEMORY_FILE" in os.environ:
        atexit.register(write_peak_memory)
    runpy.run_path(script, run_name="__main__")
