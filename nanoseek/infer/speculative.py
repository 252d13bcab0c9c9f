"""MTP speculative decoding (DeepSeek-V3 §5.4.3): the first MTP module drafts the token after next, the main model
checks it in the same forward pass that processes the pending token.

State of a row at the start of a step (column f is the frontier):
    cache (main layers) holds tokens up to f-1;  pending t_f was sampled from the main model at f-1;
    the MTP layer of the cache holds positions up to f-1;  draft d ~ q = MTP(h_{f-1}, Emb(t_f)) predicts t_{f+1}.
Verify: one main forward of [t_f, d] at columns f, f+1 gives p_f (the law of t_{f+1}) and p_{f+1} (of t_{f+2}).
    accept d with probability min(1, p_f(d) / q(d))          (greedy: iff argmax p_f == d)
    accepted -> emit d and a bonus token ~ p_{f+1};  rejected -> emit a token ~ norm(max(0, p_f - q)) and mark
    column f+1 (which holds d) as a hole in the row's key_mask.
This is the rejection scheme of Leviathan et al. (2023) / Chen et al. (2023): every emitted token has exactly the
law the main model gives it, so greedy output is identical to plain decoding and sampled output has the same
distribution. Draft: the MTP block then runs over the same two columns (h_j from the verify pass, Emb of the token
that follows column j) and its output at the row's last real column drafts the next step's token.
"""

from __future__ import annotations

import torch

from nanoseek.infer.decoder import norm
from nanoseek.infer.sampling import RowParams, distribution, draw, sample, uniforms
from nanoseek.model.mla import LatentCache


def accept_draft(p: torch.Tensor, q: torch.Tensor, draft: torch.Tensor, u_accept: torch.Tensor,
                 u_resample: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Speculative rejection step for one drafted token per row.

    p, q [B, V]: target and draft probabilities; draft [B] ~ q; u_accept, u_resample [B] uniforms.
    Returns (accepted [B] bool, replacement [B]: a draw from norm(max(0, p - q)), meaningful where rejected).
    """
    rows = torch.arange(p.shape[0], device=p.device)
    p_d, q_d = p[rows, draft], q[rows, draft]
    accepted = u_accept * q_d < p_d  # u < p/q without dividing (q_d > 0: d was drawn from q)
    residual = (p - q).clamp(min=0)
    empty = residual.sum(-1, keepdim=True) <= 0  # p == q: a rejection is impossible, fall back to p
    residual = torch.where(empty, p, residual)
    return accepted, draw(residual, u_resample)


class MTPDrafter:
    """The speculative half of an `Engine` built with speculative=True (it owns the draft of every row)."""

    def __init__(self, engine):
        self.engine = engine
        self.model = engine.model
        self.mtp = self.model.mtp[0]
        V, B = self.model.config.vocab_size, engine.max_batch
        self.draft_tokens = torch.zeros(B, dtype=torch.long, device=engine.device)
        self.draft_probs = torch.zeros(B, V, device=engine.device)  # q of each row's draft (sampled rows)
        self.proposed = 0
        self.accepted = 0
        self._last: tuple | None = None  # (h [n, 2, D], next ids [n, 2], accepted [n]) from verify, for draft

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / max(self.proposed, 1)

    def move_row(self, src: int, dst: int) -> None:
        self.draft_tokens[dst] = self.draft_tokens[src]
        self.draft_probs[dst] = self.draft_probs[src]

    # --- drafting -------------------------------------------------------------------------------
    def _mtp_logits(self, h: torch.Tensor, next_ids: torch.Tensor, cache: LatentCache, start: int,
                    key_mask: torch.Tensor | None, positions: torch.Tensor | None, cols: torch.Tensor) -> torch.Tensor:
        """Run the MTP block over t columns: h [n, t, D] main hidden states, next_ids [n, t] the token after each
        column. Returns the draft logits [n, V] at column cols[b] of each row b."""
        n, t = next_ids.shape
        if positions is None:
            positions = torch.arange(start, start + t, device=h.device)
        decoder = self.engine.decoder
        if start > 0 and decoder is not None:  # the engine's decode step (same math as the model's)
            x = decoder.mtp(h, next_ids, positions, start, key_mask, cache)
        else:
            x = self.mtp.combine(h, self.model.embed(next_ids))
            cos, sin = self.model.rotary(positions)
            x, _ = self.mtp.block(x, cos, sin, cache=cache, start=start, key_mask=key_mask)
        x = x[torch.arange(n, device=h.device), cols]
        return self.model.head(norm(self.mtp.norm, x))

    def _sample_drafts(self, logits: torch.Tensor, rows: slice) -> None:
        e = self.engine
        rp: RowParams = e.row_params.select(rows)
        pen = e.penalties
        counts = pen.output_counts[rows] if pen is not None else None
        seen = pen.prompt_seen[rows] if pen is not None else None
        if rp.all_greedy:
            self.draft_tokens[rows] = sample(logits, rp, [], counts, seen)
            return
        probs = distribution(logits, rp, counts, seen)
        self.draft_tokens[rows] = draw(probs, uniforms([s.generator for s in e.rows[rows]])[:, 0])
        self.draft_probs[rows] = probs

    @torch.no_grad()
    def prefill(self, rows: slice, ids: torch.Tensor, h: torch.Tensor, first: torch.Tensor,
                key_mask: torch.Tensor | None, positions: torch.Tensor | None) -> None:
        """Fill the MTP layer over newly admitted prompts and draft their second token.
        ids [k, P] left-padded prompts, h [k, P, D] their final hidden states, first [k] the sampled tokens."""
        e = self.engine
        f, P = e.frontier, ids.shape[1]
        next_ids = torch.cat([ids[:, 1:], first[:, None]], dim=1)
        view = e.cache.view(rows, slice(f - P, f))
        cols = torch.full((ids.shape[0],), P - 1, device=ids.device)
        logits = self._mtp_logits(h, next_ids, view, 0, key_mask, positions, cols)
        self._sample_drafts(logits, rows)

    @torch.no_grad()
    def draft(self) -> None:
        """After `verify`: run the MTP block over the two verified columns and draft every row's next token."""
        e = self.engine
        h, next_ids, accepted = self._last
        n = h.shape[0]
        f = e.frontier - 2
        positions = e.positions[:n, None] - 1 - accepted[:, None].long() + torch.arange(2, device=h.device)
        logits = self._mtp_logits(h, next_ids, e.view(n), f, e.mask(n, f + 2), positions, accepted.long())
        self._sample_drafts(logits, slice(0, n))

    # --- verification ---------------------------------------------------------------------------
    @torch.no_grad()
    def verify(self) -> tuple[dict[int, list[int]], dict[int, list] | None]:
        """Check every row's draft in one forward pass; returns each row's new tokens (1 or 2) and, for requests
        that asked, the experts of each (those of the position whose output produced the token)."""
        e = self.engine
        n, f = len(e.rows), e.frontier
        ids = torch.stack([e.pending[:n], self.draft_tokens[:n]], dim=1)  # [n, 2]
        e.key_mask[:n, f:f + 2] = True
        positions = e.positions[:n, None] + torch.arange(2, device=ids.device)
        with e._routing(any(s.request.routing for s in e.rows)) as routes:
            h = e.forward(ids, n, f, positions)
        logits = self.model.head(h)  # [n, 2, V]
        rows = slice(0, n)
        rp: RowParams = e.row_params.select(rows)
        pen = e.penalties
        counts = pen.output_counts[:n] if pen is not None else None
        seen = pen.prompt_seen[:n] if pen is not None else None
        draft = self.draft_tokens[:n]
        counts_after = None
        if rp.any_penalty:  # p_{f+1} sees the draft among the output tokens
            counts_after = counts.clone()
            counts_after[torch.arange(n), draft] += 1
        if rp.all_greedy:
            replacement = sample(logits[:, 0], rp, [], counts, seen)
            bonus = sample(logits[:, 1], rp, [], counts_after, seen)
            accepted = replacement == draft
        else:
            p0 = distribution(logits[:, 0], rp, counts, seen)
            p1 = distribution(logits[:, 1], rp, counts_after, seen)
            u = uniforms([s.generator for s in e.rows], 2)
            q = self.draft_probs[:n]
            greedy = rp.temperature == 0  # greedy rows drafted an argmax: q is a one-hot at the draft
            q = torch.where(greedy[:, None], torch.zeros_like(q).scatter_(1, draft[:, None], 1.0), q)
            accepted, replacement = accept_draft(p0, q, draft, u[:, 0], u[:, 1])
            bonus = draw(p1, u[:, 1])
        new_pending = torch.where(accepted, bonus, replacement)
        e.key_mask[torch.arange(n)[~accepted], f + 1] = False
        e.positions[:n] += 1 + accepted.long()
        e.pending[:n] = new_pending
        e.frontier += 2
        self.proposed += n
        self.accepted += int(accepted.sum())
        next_ids = torch.stack([torch.where(accepted, draft, replacement), new_pending], dim=1)
        self._last = (h, next_ids, accepted)
        acc, d, b, r = accepted.tolist(), draft.tolist(), bonus.tolist(), replacement.tolist()
        tokens = {i: ([d[i], b[i]] if acc[i] else [r[i]]) for i in range(n)}
        experts = None
        if routes is not None:
            first, second = routes.at(n, 2, [0] * n), routes.at(n, 2, [1] * n)
            experts = {i: ([first[i], second[i]] if acc[i] else [first[i]]) for i in range(n)}
        return tokens, experts
