"""The DeepSeek-V3 decoder: embedding -> blocks (MLA + dense MLP or MoE) -> final RMSNorm -> untied head,
plus D multi-token-prediction modules used in training and for speculative drafting."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.model.config import ModelConfig
from nanoseek.model.mla import MLA, LatentCache
from nanoseek.model.moe import MLP, GroupedExperts, MoE
from nanoseek.model.mtp import MTPModule
from nanoseek.model.norm import RMSNorm
from nanoseek.model.rope import Rotary


@dataclass
class ModelOutput:
    logits: torch.Tensor  # [B, T, V]
    mtp_logits: list[torch.Tensor] = field(default_factory=list)  # depth k: [B, T-k, V], predicts t_{i+k+1}
    balance_loss: torch.Tensor | None = None  # Σ over MoE layers of Σ_i f_i P_i (not yet × α)
    expert_counts: torch.Tensor | None = None  # [n_moe_layers, E] routed (token, expert) pairs
    hidden: torch.Tensor | None = None  # [B, T, D] final normed hidden state (h^0 of MTP)
    indexer_loss: torch.Tensor | None = None  # DSA: the indexers' KL, mean over layers (MTP's included)


class Block(nn.Module):
    """Pre-norm decoder layer: x + MLA(norm(x)), then + FFN(norm(x)), the FFN dense or MoE by layer index."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = MLA(cfg, layer_idx)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.is_moe = cfg.is_moe_layer(layer_idx)
        self.ffn = MoE(cfg) if self.is_moe else MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: LatentCache | None = None,
                start: int = 0, key_mask: torch.Tensor | None = None, stats: bool = False
                ) -> tuple[torch.Tensor, dict | None]:
        a, kl = self.attn(self.attn_norm(x), cos, sin, cache, start, key_mask, indexer_loss=stats)
        x = x + a
        y, aux = self.feed_forward(x, stats)
        if kl is not None:
            aux = {**(aux or {}), "indexer_kl": kl}
        return x + y, aux

    def feed_forward(self, x: torch.Tensor, stats: bool = False) -> tuple[torch.Tensor, dict | None]:
        """The FFN half on x [B, T, D] (before its residual add), and the MoE's statistics when asked for."""
        if not self.is_moe:
            return self.ffn(self.ffn_norm(x)), None
        return self.ffn(self.ffn_norm(x), stats)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        L = cfg.num_hidden_layers
        self.mtp = nn.ModuleList(MTPModule(cfg, k, Block(cfg, L + k - 1))
                                 for k in range(1, cfg.num_nextn_predict_layers + 1))
        self.rotary = Rotary(cfg)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self, std: float | None = None) -> None:
        """Every weight matrix ~ N(0, std) (std 0.006 in the paper), norms 1, biases 0, balancing biases 0."""
        std = self.config.initializer_range if std is None else std
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, 0.0, std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, GroupedExperts):
                nn.init.normal_(m.gate_up_proj, 0.0, std)
                nn.init.normal_(m.down_proj, 0.0, std)
            elif isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)
        for moe in self.moe_layers():
            nn.init.normal_(moe.gate.weight, 0.0, std)
            moe.gate.e_score_correction_bias.zero_()

    def moe_layers(self) -> list[MoE]:
        """MoE FFNs in order: main blocks, then MTP blocks (rows of `expert_counts`)."""
        blocks = [*self.blocks, *(m.block for m in self.mtp)]
        return [b.ffn for b in blocks if b.is_moe]

    # --- forward ---------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, extras: bool = False,
                key_mask: torch.Tensor | None = None, hidden: bool = False) -> torch.Tensor | ModelOutput:
        """input_ids [B, T] -> logits [B, T, V]; with extras=True a ModelOutput with MTP logits, the balance loss
        and expert counts. key_mask [B, T] marks real (non-padding) tokens of left- or right-padded batches.
        hidden=True returns the final normed hidden state [B, T, D] instead of logits, for callers that need the
        head at a few positions only (RL scores completion tokens, not prompts)."""
        T = input_ids.shape[1]
        cos, sin = self.rotary(torch.arange(T, device=input_ids.device))
        emb = self.embed(input_ids)
        x, auxes = emb, []
        for block in self.blocks:
            x, aux = block(x, cos, sin, key_mask=key_mask, stats=extras)
            auxes.append(aux)
        h = self.norm(x)
        if hidden:
            return h
        logits = self.head(h)
        if not extras:
            return logits
        mtp_logits, h_prev = [], h
        for m in self.mtp:
            Tk = T - m.depth
            if Tk <= 0:
                break
            x = m.combine(h_prev[:, :Tk], emb[:, m.depth:])
            mask = None if key_mask is None else key_mask[:, m.depth:]
            x, aux = m.block(x, cos[:Tk], sin[:Tk], key_mask=mask, stats=True)
            auxes.append(aux)
            mtp_logits.append(self.head(m.norm(x)))
            h_prev = x
        moe = [a for a in auxes if a is not None and "counts" in a]
        counts = torch.stack([a["counts"] for a in moe]) if moe else None
        balance = torch.stack([a["balance_loss"] for a in moe]).sum() if moe else logits.new_zeros(())
        kls = [a["indexer_kl"] for a in auxes if a is not None and "indexer_kl" in a]
        return ModelOutput(logits, mtp_logits, balance, counts, h, torch.stack(kls).mean() if kls else None)

    def sparse_attention(self, on: bool) -> None:
        """DSA: attend to the indexer's top-k keys (on) or to all keys (off: V3.2's dense warm-up)."""
        for block in [*self.blocks, *(m.block for m in self.mtp)]:
            block.attn.sparse = on

    def forward_cached(self, input_ids: torch.Tensor, cache: LatentCache, start: int,
                       key_mask: torch.Tensor | None = None, positions: torch.Tensor | None = None,
                       hidden: bool = False) -> torch.Tensor:
        """Prefill (start == 0) or decode (start > 0) through the latent cache. input_ids [B, t] -> logits [B, t, V].

        positions [B, t] overrides the rotary positions (left-padded batches count positions from each prompt's
        first real token); by default they are start..start+t-1. hidden=True returns the final normed hidden state
        [B, t, D] instead (h^0 of MTP drafting; the caller applies `self.head` to just the positions it needs).
        """
        t = input_ids.shape[1]
        if positions is None:
            positions = torch.arange(start, start + t, device=input_ids.device)
        cos, sin = self.rotary(positions)
        x = self.embed(input_ids)
        for block in self.blocks:
            x, _ = block(x, cos, sin, cache=cache, start=start, key_mask=key_mask)
        h = self.norm(x)
        return h if hidden else self.head(h)

    def loss(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Plain next-token cross-entropy (no MTP / balance terms): handy for evaluation."""
        logits = self(input_ids)
        return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)

    # --- generation, saving, sizes ---------------------------------------------------------------
    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 32, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None, eos_token_id: int | None = None,
                 seed: int | None = None) -> torch.Tensor:
        """prompt [B, T] -> prompt + up to max_new_tokens generated ids; greedy when temperature == 0."""
        from nanoseek.model.generation import generate

        return generate(self, input_ids, max_new_tokens, temperature, top_k, top_p, eos_token_id, seed)

    def save_pretrained(self, path: str | Path, extra_files: dict[str, dict] | None = None) -> Path:
        from nanoseek.model.hf import save_pretrained

        return save_pretrained(self, path, extra_files)

    def num_params(self, active: bool = False, mtp: bool = False) -> int:
        """Parameter count of the main model (MTP modules excluded unless mtp=True).
        active=True counts only the K of E routed experts a token uses."""
        n = 0
        for name, p in self.named_parameters():
            if name.startswith("mtp.") and not mtp:
                continue
            if active and name.endswith(("experts.gate_up_proj", "experts.down_proj")):
                n += p.numel() * self.config.num_experts_per_tok // self.config.n_routed_experts
            else:
                n += p.numel()
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward): 6 × active non-embedding parameters + attention scores."""
        c = self.config
        matmul_params = self.num_params(active=True) - self.embed.weight.numel()
        attention = 6 * c.num_hidden_layers * c.num_attention_heads * (c.qk_head_dim + c.v_head_dim) * seq_len
        return 6 * matmul_params + attention
