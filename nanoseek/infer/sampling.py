"""Sampling: per-request parameters and one batched logits -> next-token step with per-row settings.

Rows of a batch belong to different requests (continuous batching), so every knob is a per-row tensor and every
row draws its random numbers from its own `torch.Generator`: a seeded request gives the same tokens whatever else
shares its batch. Order of operations (as transformers applies its logits processors):
    penalties (repetition, presence, frequency) -> temperature -> top-k -> top-p -> min-p -> draw.
Temperature 0 means greedy: the argmax of the penalised logits.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    """What one request asks for. Defaults: greedy, 256 new tokens, stop at the tokenizer's end of sequence.

    repetition_penalty follows CTRL / transformers (divide positive, multiply negative logits of every token seen
    in prompt or output); presence/frequency penalties follow OpenAI (subtract, output tokens only).
    """

    max_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    n: int = 1  # independent samples of the same prompt
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the offending field. Integers must fit the tensors the engine stacks them into
        (`RowParams`: int64), so a bad request is refused here and never reaches the engine's thread."""
        checks = [
            ("max_tokens", isinstance(self.max_tokens, int) and self.max_tokens >= 1, "an integer >= 1"),
            ("temperature", 0.0 <= self.temperature <= 100.0, "in [0, 100]"),
            ("top_k", isinstance(self.top_k, int) and 0 <= self.top_k < 2**63, "an integer in [0, 2^63) (0 = off)"),
            ("top_p", 0.0 < self.top_p <= 1.0, "in (0, 1]"),
            ("min_p", 0.0 <= self.min_p <= 1.0, "in [0, 1]"),
            ("repetition_penalty", 0.0 < self.repetition_penalty <= 10.0, "in (0, 10]"),
            ("presence_penalty", -2.0 <= self.presence_penalty <= 2.0, "in [-2, 2]"),
            ("frequency_penalty", -2.0 <= self.frequency_penalty <= 2.0, "in [-2, 2]"),
            ("n", isinstance(self.n, int) and self.n >= 1, "an integer >= 1"),
            ("seed", self.seed is None or isinstance(self.seed, int), "an integer or None"),
            ("stop", all(isinstance(s, str) and s for s in self.stop), "a list of non-empty strings"),
            ("stop_token_ids", all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids),
             "a list of token ids"),
        ]
        for name, ok, what in checks:
            if not ok:
                raise ValueError(f"sampling parameter {name}={getattr(self, name)!r} must be {what}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalised(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


def row_generator(seed: int | None, index: int = 0) -> torch.Generator:
    """The random stream of one sample: from (seed, sample index) when seeded, else from torch's global RNG
    (so `torch.manual_seed` still makes a whole run reproducible)."""
    if seed is None:
        seed = int(torch.randint(0, 2**62, ()).item())
    mixed = (seed + index * 0x9E3779B97F4A7C15) % 2**63  # n samples of one seed get unrelated streams
    return torch.Generator().manual_seed(mixed)


class Penalties:
    """Token statistics for the penalties of a batch: counts of generated tokens [B, V] and tokens seen in the
    prompt [B, V]. Kept only for rows that ask for a penalty (others cost nothing)."""

    def __init__(self, batch: int, vocab: int, device: torch.device | str = "cpu"):
        self.output_counts = torch.zeros(batch, vocab, dtype=torch.int32, device=device)
        self.prompt_seen = torch.zeros(batch, vocab, dtype=torch.bool, device=device)

    def reset_row(self, row: int, prompt: list[int]) -> None:
        self.output_counts[row].zero_()
        self.prompt_seen[row].zero_()
        if prompt:
            self.prompt_seen[row, torch.tensor(prompt, device=self.prompt_seen.device)] = True

    def move_row(self, src: int, dst: int) -> None:
        self.output_counts[dst] = self.output_counts[src]
        self.prompt_seen[dst] = self.prompt_seen[src]

    def add(self, rows: torch.Tensor, tokens: torch.Tensor) -> None:
        """Count generated tokens [n] of rows [n]."""
        self.output_counts[rows, tokens] += 1


def apply_penalties(logits: torch.Tensor, counts: torch.Tensor, prompt_seen: torch.Tensor,
                    repetition: torch.Tensor, presence: torch.Tensor, frequency: torch.Tensor) -> torch.Tensor:
    """logits [B, V] float; counts [B, V] int (output tokens); prompt_seen [B, V] bool; per-row penalties [B]."""
    seen = prompt_seen | (counts > 0)
    rep = repetition[:, None]
    penalised = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(seen, penalised, logits)
    return logits - presence[:, None] * (counts > 0) - frequency[:, None] * counts


def filter_logits(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                  min_p: torch.Tensor) -> torch.Tensor:
    """The sampling distribution of each row as logits with -inf for excluded tokens.

    logits [B, V] float; temperature [B] (> 0); top_k [B] long (0 = off); top_p, min_p [B] float.
    The softmax of the result is the exact distribution a token is drawn from (speculative decoding needs it).
    """
    logits = logits / temperature[:, None]
    V = logits.shape[-1]
    if bool(((top_k > 0) & (top_k < V)).any()) or bool((top_p < 1.0).any()):
        sorted_logits, order = logits.sort(-1, descending=True)
        k = torch.where(top_k > 0, top_k.clamp(max=V), V)
        ranks = torch.arange(V, device=logits.device)
        drop = ranks[None, :] >= k[:, None]  # [B, V] in sorted order
        probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(-1)
        # nucleus: keep the smallest prefix whose mass reaches top_p (the token crossing the line stays)
        drop |= (probs.cumsum(-1) - probs) >= top_p[:, None]
        drop[:, 0] = False  # never drop the most likely token
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    if bool((min_p > 0).any()):
        probs = logits.softmax(-1)
        floor = min_p[:, None] * probs.max(-1, keepdim=True).values
        logits = logits.masked_fill(probs < floor, float("-inf"))
    return logits


def draw(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw: probs [B, V] (rows need not be normalised), uniforms [B] in [0, 1) -> ids [B].
    A zero-probability token is never drawn (`right=True` skips flat stretches of the CDF)."""
    cdf = probs.cumsum(-1)
    target = (uniforms * cdf[:, -1])[:, None]
    return torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp(max=probs.shape[-1] - 1)


def uniforms(generators: list[torch.Generator], count: int = 1) -> torch.Tensor:
    """[B, count] uniforms, row b from generators[b]."""
    return torch.stack([torch.rand(count, generator=g) for g in generators])


@dataclass
class RowParams:
    """The per-row parameter tensors of a batch, rebuilt when the batch's membership changes."""

    temperature: torch.Tensor  # [B] float (0 for greedy rows)
    top_k: torch.Tensor  # [B] long
    top_p: torch.Tensor  # [B] float
    min_p: torch.Tensor  # [B] float
    repetition: torch.Tensor  # [B] float
    presence: torch.Tensor  # [B] float
    frequency: torch.Tensor  # [B] float
    all_greedy: bool
    any_penalty: bool

    @classmethod
    def stack(cls, params: list[SamplingParams], device: torch.device | str = "cpu") -> RowParams:
        def col(name: str, dtype=torch.float32) -> torch.Tensor:
            return torch.tensor([getattr(p, name) for p in params], dtype=dtype, device=device)

        return cls(col("temperature"), col("top_k", torch.long), col("top_p"), col("min_p"),
                   col("repetition_penalty"), col("presence_penalty"), col("frequency_penalty"),
                   all(p.greedy for p in params), any(p.penalised for p in params))

    def select(self, rows: slice) -> RowParams:
        """The parameters of a contiguous range of rows."""
        t, rep, pres, freq = self.temperature[rows], self.repetition[rows], self.presence[rows], self.frequency[rows]
        any_penalty = bool(((rep != 1) | (pres != 0) | (freq != 0)).any()) if self.any_penalty else False
        return RowParams(t, self.top_k[rows], self.top_p[rows], self.min_p[rows], rep, pres, freq,
                         self.all_greedy or bool((t == 0).all()), any_penalty)


def distribution(logits: torch.Tensor, rp: RowParams, counts: torch.Tensor | None = None,
                 prompt_seen: torch.Tensor | None = None) -> torch.Tensor:
    """Sampling probabilities [B, V] of every row; a greedy row is a one-hot at its (penalised) argmax."""
    logits = logits.float()
    if rp.any_penalty and counts is not None:
        logits = apply_penalties(logits, counts, prompt_seen, rp.repetition, rp.presence, rp.frequency)
    greedy = rp.temperature == 0
    safe_t = torch.where(greedy, torch.ones_like(rp.temperature), rp.temperature)
    probs = filter_logits(logits, safe_t, rp.top_k, rp.top_p, rp.min_p).softmax(-1)
    if bool(greedy.any()):
        onehot = torch.zeros_like(probs).scatter_(1, logits.argmax(-1, keepdim=True), 1.0)
        probs = torch.where(greedy[:, None], onehot, probs)
    return probs


def sample(logits: torch.Tensor, rp: RowParams, generators: list[torch.Generator],
           counts: torch.Tensor | None = None, prompt_seen: torch.Tensor | None = None) -> torch.Tensor:
    """logits [B, V] -> next token ids [B]. All-greedy batches skip the distribution entirely."""
    if rp.all_greedy:
        logits = logits.float()
        if rp.any_penalty and counts is not None:
            logits = apply_penalties(logits, counts, prompt_seen, rp.repetition, rp.presence, rp.frequency)
        return logits.argmax(-1)
    probs = distribution(logits, rp, counts, prompt_seen)
    return draw(probs, uniforms(generators)[:, 0].to(probs.device))
