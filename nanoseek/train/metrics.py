"""Training metrics: an append-only JSONL file (the record), MFU against a matmul peak, and PNG plots.

`metrics.jsonl` holds one JSON object per line; train steps carry `step` and `loss`, validation lines carry
`val_loss`, events (skipped steps, resume) carry `event`. Plots and summaries are derived from it, never the
other way round. On resume, lines written after the checkpoint being resumed are dropped once, so the file
reads as one uninterrupted run.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from nanoseek.common import atomic_write

# Dense (non-sparse) matmul peaks in FLOP/s for common accelerators: (name substring, dtype) -> peak.
GPU_PEAKS: dict[tuple[str, torch.dtype], float] = {
    ("H100", torch.bfloat16): 989e12, ("H100", torch.float8_e4m3fn): 1979e12, ("H100", torch.float32): 495e12,
    ("H200", torch.bfloat16): 989e12, ("H200", torch.float8_e4m3fn): 1979e12, ("H200", torch.float32): 495e12,
    ("A100", torch.bfloat16): 312e12, ("A100", torch.float32): 156e12,  # fp32 via TF32 tensor cores
    ("L4", torch.bfloat16): 121e12, ("L4", torch.float8_e4m3fn): 242e12, ("L4", torch.float32): 60e12,
}


class MetricsWriter:
    """Appends one JSON line per record and flushes it, so a killed run loses at most the line being written."""

    def __init__(self, path: str | Path, resume_step: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            truncate_after(self.path, resume_step)
        self._file = open(self.path, "a")  # noqa: SIM115 - kept open for the whole run

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All complete records of a metrics file; a torn last line (process killed mid-write) is ignored."""
    records = []
    lines = Path(path).read_text().splitlines()
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines):
                break
            raise ValueError(f"{path}:{i}: not valid JSON ({e})") from e
    return records


def truncate_after(path: Path, step: int) -> None:
    """Atomically drop records of steps after `step` (and a torn last line): the state a resume starts from."""
    keep = [r for r in read_metrics(path) if r.get("step", 0) <= step]
    atomic_write(path, lambda tmp: Path(tmp).write_text("".join(json.dumps(r) + "\n" for r in keep)))


# --- model FLOPs utilisation --------------------------------------------------------------------------------
_measured: dict[tuple[str, torch.dtype], float] = {}


def matmul_peak_flops(device: torch.device | str, dtype: torch.dtype = torch.float32) -> float:
    """Peak matmul FLOP/s: a table value for known GPUs, otherwise measured with a 1024³ GEMM (best of 5)."""
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for (key, dt), peak in GPU_PEAKS.items():
            if key in name and dt == dtype:
                return peak
    if dtype == torch.float8_e4m3fn:  # an unlisted GPU: FP8 runs at about twice its bf16 rate
        return 2 * matmul_peak_flops(device, torch.bfloat16)
    key = (str(device), dtype)
    if key not in _measured:
        n = 1024
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        best = math.inf
        for _ in range(6):
            _sync(device)
            t0 = time.perf_counter()
            a @ b
            _sync(device)
            best = min(best, time.perf_counter() - t0)
        _measured[key] = 2 * n**3 / best
    return _measured[key]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def mfu(tokens_per_s: float, flops_per_token: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: achieved training FLOP/s (6N + attention per token) over the matmul peak."""
    return tokens_per_s * flops_per_token / peak_flops


# --- plots --------------------------------------------------------------------------------------------------
PLOTS = {  # file -> (title, [(record key, label)])
    "loss.png": ("loss", [("loss", "train"), ("val_loss", "validation"), ("mtp_loss", "MTP")]),
    "lr.png": ("learning rate", [("lr", "lr")]),
    "grad_norm.png": ("gradient norm (before clipping)", [("grad_norm", "grad norm")]),
    "max_vio.png": ("MaxVio (mean over MoE layers)", [("max_vio_mean", "train"), ("val_max_vio_mean", "validation")]),
    "throughput.png": ("tokens / s", [("tokens_per_s", "tokens/s")]),
}


def plot_metrics(metrics_path: str | Path, out_dir: str | Path) -> list[Path]:
    """One PNG per panel of PLOTS, from metrics.jsonl. Returns [] when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    records = read_metrics(metrics_path)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for filename, (title, series) in PLOTS.items():
        lines = [(label, [(r["step"], r[key]) for r in records if r.get(key) is not None and "step" in r])
                 for key, label in series]
        lines = [(label, pts) for label, pts in lines if pts]
        if not lines:
            continue
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for label, pts in lines:
            ax.plot(*zip(*pts, strict=True), label=label, marker="o" if len(pts) < 30 else None, markersize=3)
        ax.set_xlabel("step")
        ax.set_title(title)
        if len(lines) > 1:
            ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = out_dir / filename
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written
