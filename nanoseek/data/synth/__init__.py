"""Built-in corpora: seeded, any size, with difficulty levels (see tasks.py, text.py, games.py, corpus.py)."""

from nanoseek.data.synth.corpus import DOMAIN_MIX, NgramIndex, write_synth
from nanoseek.data.synth.tasks import (
    EVAL_FRACTION,
    R1_ZERO_TEMPLATE,
    TASKS,
    Problem,
    Task,
    canonical_key,
    eval_expression,
    iter_problems,
    make_problems,
    parse_number,
    r1_zero_prompt,
    split_of,
)

__all__ = [
    "DOMAIN_MIX", "EVAL_FRACTION", "R1_ZERO_TEMPLATE", "TASKS", "NgramIndex", "Problem", "Task", "canonical_key",
    "eval_expression", "iter_problems", "make_problems", "parse_number", "r1_zero_prompt", "split_of",
    "write_synth",
]
