"""Autoregressive decoding through the MLA latent cache (prefill once, then one token at a time)."""

from __future__ import annotations

import torch

from nanoseek.model.mla import LatentCache


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [B, V] -> token ids [B]. Greedy (argmax) at temperature 0; otherwise top-k, then nucleus (top-p)."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p  # keep the smallest prefix whose mass reaches top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, eos_token_id: int | None = None,
             seed: int | None = None) -> torch.Tensor:
    """prompt [B, T] -> [B, T + n]. Sequences that emitted eos_token_id keep emitting it until all are done."""
    B, T = input_ids.shape
    cfg = model.config
    dtype = next(model.parameters()).dtype
    cache = LatentCache.empty(cfg, B, T + max_new_tokens, layers=cfg.num_hidden_layers, dtype=dtype,
                              device=input_ids.device)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=input_ids.device).manual_seed(seed)
    logits = model.forward_cached(input_ids, cache, 0)[:, -1]
    out, done = [input_ids], torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    for step in range(max_new_tokens):
        token = sample_next(logits, temperature, top_k, top_p, generator)
        if eos_token_id is not None:
            token = token.masked_fill(done, eos_token_id)
            done |= token == eos_token_id
        out.append(token[:, None])
        if step == max_new_tokens - 1 or bool(done.all()):
            break
        logits = model.forward_cached(token[:, None], cache, T + step)[:, -1]
    return torch.cat(out, dim=1)
