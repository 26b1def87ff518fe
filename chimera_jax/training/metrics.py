"""Metric sinks: DIR/metrics.jsonl (one JSON object per logged step), TensorBoard events, the console."""
from __future__ import annotations

import json
import math
import os
from typing import Any

import jax
import numpy as np

# Dense bf16 peak of each accelerator (datasheet), for model FLOPs utilisation.
PEAK_BF16_FLOPS = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12, "TPU v5": 459e12, "TPU v4": 275e12,
                   "TPU v6": 918e12}


def peak_flops(device=None) -> float | None:
    device = device or jax.devices()[0]
    kind = getattr(device, "device_kind", "")
    for name, flops in PEAK_BF16_FLOPS.items():
        if name.lower() in kind.lower():
            return flops
    return None


def _scalar(v: Any) -> float:
    v = float(np.asarray(v))
    return v if math.isfinite(v) else float("nan")


class MetricWriter:
    """Writes on process 0 only; every other process gets a writer that drops everything."""

    def __init__(self, workdir: str, *, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self._tb = None
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), **{k: _scalar(v) for k, v in metrics.items()}}
        # allow_nan keeps a diverged run's NaN visible instead of crashing the logger.
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for k, v in row.items():
                if k != "step":
                    self._tb.add_scalar(k, v, int(step))

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            if self._tb is not None:
                self._tb.close()


def read_metrics(workdir: str) -> list[dict[str, float]]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]
