"""Evaluation: tasks (tasks.py), metrics (metrics.py), game environments (games.py), the `nanoseek eval` command
(evaluate.py) and the run's report card (report.py)."""

from nanoseek.eval.evaluate import evaluate
from nanoseek.eval.metrics import (
    bits_per_byte,
    bootstrap_ci,
    consistency,
    format_rate,
    hallucination,
    majority_vote,
    mean_pass_at_k,
    paired_bootstrap_ci,
    pass_at_k,
)
from nanoseek.eval.report import write_report
from nanoseek.eval.tasks import load_task

__all__ = [
    "bits_per_byte", "bootstrap_ci", "consistency", "evaluate", "format_rate", "hallucination", "load_task",
    "majority_vote", "mean_pass_at_k", "paired_bootstrap_ci", "pass_at_k", "write_report",
]
