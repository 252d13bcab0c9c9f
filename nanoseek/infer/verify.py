"""The verification loop: several reasoning chains for one question, in one batch; the answer most of them reach
(cons@n, self-consistency) is returned, with their agreement as its confidence, and "I'm not sure" below a
threshold instead of a confident-sounding guess.

Answers are read with `nanoseek.rewards.extract_answer` (the final answer after the reasoning) and grouped by
value with `answers_equal` ("0.5" and "1/2" vote together), the same rules RL rewards and evaluation use.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from nanoseek.infer.engine import Backend
from nanoseek.infer.reasoning import split_reasoning
from nanoseek.infer.sampling import SamplingParams
from nanoseek.rewards import answers_equal, extract_answer

NOT_SURE = "I'm not sure."
DEFAULT_PARAMS = SamplingParams(max_tokens=512, temperature=0.6, top_p=0.95)  # DeepSeek-R1's evaluation setting


@dataclass
class Verdict:
    answer: str | None  # the consensus answer (None when no chain produced an answer)
    confidence: float  # votes / n
    votes: int
    n: int
    sure: bool  # confidence >= threshold
    chosen: int | None  # index of the first chain that reached the consensus answer
    answers: list[str | None] = field(default_factory=list)  # each chain's extracted answer
    completions: list[str] = field(default_factory=list)  # each chain as the model wrote it (with its <think>)

    @property
    def reply(self) -> str:
        """What to tell the user: the chosen chain's answer text, or an honest "not sure" with the best guess."""
        if self.sure and self.chosen is not None:
            return split_reasoning(self.completions[self.chosen], thinking=False)[1]
        if self.answer is None:
            return f"{NOT_SURE} None of {self.n} attempts reached an answer."
        return f"{NOT_SURE} The most common answer, {self.answer}, came from {self.votes} of {self.n} attempts."

    def to_dict(self) -> dict:
        return {"answer": self.answer, "confidence": self.confidence, "votes": self.votes, "n": self.n,
                "sure": self.sure, "answers": self.answers}


def vote(answers: Sequence[str | None], same: Callable[[str, str], bool] = answers_equal
         ) -> tuple[str | None, int, int | None]:
    """(consensus answer, its votes, index of its first chain): the one majority vote of the verification loop
    and of evaluation's maj@k (`nanoseek.eval.metrics.majority_vote`).

    Each answer joins the first group whose first answer it equals, tested as `same(answer, first)` (default:
    by value, so "0.5" and "1/2" vote together; tasks pass their own equality); a missing answer never wins;
    ties go to the answer seen first."""
    groups: list[list[int]] = []
    for i, a in enumerate(answers):
        if a is None:
            continue
        for g in groups:
            if same(a, answers[g[0]]):
                g.append(i)
                break
        else:
            groups.append([i])
    if not groups:
        return None, 0, None
    best = max(groups, key=len)  # max keeps the first of equally large groups
    return answers[best[0]], len(best), best[0]


def verify(backend: Backend, prompt: Sequence[int], n: int = 8, params: SamplingParams | None = None,
           threshold: float = 0.5, prefill: str = "", images=None) -> Verdict:
    """Sample n chains for `prompt` (token ids) in one batch and vote.

    params: sampling for the chains (default temperature 0.6, top-p 0.95 as DeepSeek-R1 evaluates; a seed
    makes the verdict reproducible); prefill: text the prompt already opened (`"<think>\\n"` in reasoning mode),
    put back in front of each completion so answers inside an unclosed reasoning block do not count; images: the
    prompt's pixels (a VL model, one image per `<image>`).
    """
    if n < 1:
        raise ValueError(f"verify needs n >= 1 chains, got {n}")
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"verify threshold must be in [0, 1], got {threshold}")
    params = replace(params or DEFAULT_PARAMS, n=n)
    return judge([prefill + c.text for c in backend.generate([list(prompt)], params, images=[images])], threshold)


def judge(completions: Sequence[str], threshold: float = 0.5) -> Verdict:
    """Vote over finished chains (each as the model wrote it, reasoning included)."""
    answers = [extract_answer(t) for t in completions]
    answer, votes, chosen = vote(answers)
    n = len(completions)
    confidence = votes / n
    return Verdict(answer, confidence, votes, n, answer is not None and confidence >= threshold, chosen, answers,
                   list(completions))
