"""Evaluation: tasks (tasks.py), metrics (metrics.py), game environments (games.py), the `nanoseek eval` command
(evaluate.py) and the run's report card (report.py)."""
