"""Started by test_distributed.py under torchrun: several training runs (config files given as
arguments) one after another in one process group, to pay the start-up of two processes once."""

from __future__ import annotations

import sys

import torch.distributed as dist
from rich.console import Console

from slimtune.api import finetune
from slimtune.config import load_config

if __name__ == "__main__":
    dist.init_process_group("gloo")
    try:
        for path in sys.argv[1:]:
            finetune(load_config(path), Console(quiet=True))
    finally:
        dist.destroy_process_group()
