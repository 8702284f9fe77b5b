"""Shared pytest setup: offline loggers, a deterministic thread count, the repository root."""
import os
from pathlib import Path

os.environ.setdefault('WANDB_MODE', 'offline')
os.environ.setdefault('WANDB_SILENT', 'true')
os.environ.setdefault('MPLBACKEND', 'Agg')
ROOT = Path(__file__).resolve().parent.parent
