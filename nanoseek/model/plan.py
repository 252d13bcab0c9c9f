"""A parallel layout computed for one rank of each pipeline stage: `nanoseek model-info --plan pp=16,ep=64,dp=2`.

Layout (as train/parallelize.py builds it): world = pp · ep · dp ranks. The decoder is cut into pipeline stages
(train/pipeline.py's split: embedding on the first, final norm + head + MTP on the last); inside a stage the
ep · dp ranks share the batch, routed experts are split over `ep` of them and replicated `dp` times.

Per rank (bytes, from the preset's parameter shapes):
    parameters     bf16 weights held: the stage's dense part whole, 1/ep of its routed experts
    gradients      fp32, the same elements
    optimizer      fp32 master weights + AdamW's two moments (12 B/element), ZeRO-1 sharded over the ranks that
                   hold a copy (ep·dp for dense weights, dp for an expert slice)
    activations    bf16 tensors one micro-batch leaves for backward in the stage's layers (see
                   `activation_elems_per_token`), times the micro-batches the schedule keeps in flight
    all-to-all     bf16 bytes a rank sends per step in its MoE layers: dispatch + combine, forward + backward,
                   the (ep-1)/ep of routed copies that leave the rank under uniform routing
    bubble         idle fraction of the schedule (formulas in `bubble_fraction`)
"""

from __future__ import annotations

import torch

from nanoseek.model.config import ModelConfig
from nanoseek.model.transformer import Transformer

STAGES_PER_RANK = {"gpipe": 1, "1f1b": 1, "interleaved1f1b": 2, "zbv": 2, "dualpipev": 2}


def parse_plan(text: str) -> dict[str, int | str]:
    """'pp=16,ep=64,dp=2[,schedule=dualpipev]' -> {'pp': 16, 'ep': 64, 'dp': 2, 'schedule': 'dualpipev'}."""
    plan: dict[str, int | str] = {"pp": 1, "ep": 1, "dp": 1, "schedule": "dualpipev"}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        if key not in plan or not value:
            raise ValueError(f"--plan {text!r}: expected pp=N,ep=N,dp=N[,schedule=NAME], got {item!r}")
        if key == "schedule":
            if value not in STAGES_PER_RANK:
                raise ValueError(f"--plan schedule={value!r}: expected one of {list(STAGES_PER_RANK)}")
            plan[key] = value
        elif not value.isdigit() or int(value) < 1:
            raise ValueError(f"--plan {key}={value!r}: expected a positive integer")
        else:
            plan[key] = int(value)
    return plan


def bubble_fraction(schedule: str, p: int, m: int, v: int = 2) -> float:
    """Idle share of a step for p pipeline ranks and m micro-batches, with forward F = 1, full backward B = 2
    (input half 1, weight half W = 1) and F&B = F + B per micro-batch and stage.

    gpipe, 1f1b: (p-1)/(m+p-1)                   GPipe (Huang et al. 2019), 1F1B (Narayanan et al. 2021)
    interleaved1f1b: (p-1)/(v·m+p-1)             Narayanan et al. 2021 (Megatron-LM), v stages per rank
    zbv: bubble (p-1)(F+B-2W) of 2·m·(F+B) work   ZB1P's bound (Qi et al. 2024, "Zero Bubble Pipeline
                                                  Parallelism"), which ZB-V meets, in per-stage times
    dualpipev: bubble (p-1)(F&B+B-3W)             DeepSeek-V3 report Table 2 / DualPipe README: DualPipe's
                                                  (PP/2-1)(F&B+B-3W) with PP = 2p stages on p ranks (DualPipeV)
    """
    F, B, W = 1.0, 2.0, 1.0
    if schedule in ("gpipe", "1f1b"):
        return (p - 1) / (m + p - 1)
    if schedule == "interleaved1f1b":
        return (p - 1) / (v * m + p - 1)
    work = 2 * m * (F + B)  # two stages per rank
    bubble = (p - 1) * (F + B - 2 * W) if schedule == "zbv" else (p - 1) * ((F + B) + B - 3 * W)
    return bubble / (bubble + work)


def in_flight(schedule: str, p: int, m: int) -> int:
    """Micro-batches whose activations a rank holds at the peak, in units of one stage's (GPipe: all m;
    1F1B family: p; DualPipe(V): p + 1, from the DualPipe README's table)."""
    return {"gpipe": m, "dualpipev": p + 1}.get(schedule, p)


def activation_elems_per_token(cfg: ModelConfig, moe: bool) -> int:
    """Elements one token leaves for backward in one decoder layer (no recomputation): the inputs of every
    matmul and norm and the attention output, counted from MLA's and the FFN's shapes."""
    D, H = cfg.hidden_size, cfg.num_attention_heads
    qk, v = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.v_head_dim
    attention = (2 * D  # attn_norm input, q/kv down-projection input
                 + 2 * (cfg.q_lora_rank or 0)  # q_a output, q norm output (up-projection input)
                 + 2 * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)  # kv latent + norm output
                 + H * (qk + qk + v)  # q, k, v of every head
                 + H * v)  # attention output (o_proj input)
    if moe:
        K, I = cfg.num_experts_per_tok, cfg.moe_intermediate_size
        shared = cfg.n_shared_experts * I
        ffn = 2 * D + K * D + (K * I + shared) * 3  # ffn_norm in/out, dispatched copies, gate/up/act per expert
    else:
        ffn = 2 * D + 3 * cfg.intermediate_size
    return attention + ffn + D  # + the residual stream


def plan_layout(cfg: ModelConfig, pp: int, ep: int, dp: int, schedule: str, seq_len: int, micro_batch: int,
                global_batch_tokens: int) -> dict:
    """Per pipeline rank (every rank of a stage holds the same amounts): parameters, gradients, optimizer state,
    activation and all-to-all bytes, plus the schedule's bubble. See the module docstring for the rules."""
    if cfg.n_routed_experts % ep:
        raise ValueError(f"--plan ep={ep} does not divide n_routed_experts={cfg.n_routed_experts}")
    with torch.device("meta"):
        model = Transformer(cfg)
    L, D = cfg.num_hidden_layers, cfg.hidden_size
    v = STAGES_PER_RANK[schedule]
    n_stages = v * pp
    if n_stages > L:
        raise ValueError(f"--plan pp={pp} with {schedule} makes {n_stages} stages for {L} layers")
    base, extra = divmod(L, n_stages)
    sizes = [base + (s < extra) for s in range(n_stages)]
    starts = [sum(sizes[:s]) for s in range(n_stages)]

    def owner(s: int) -> int:  # train/pipeline.py's stage_owner
        return s % pp if v == 1 or schedule == "interleaved1f1b" or s < pp else 2 * pp - 1 - s

    def dense_expert(module: torch.nn.Module) -> tuple[int, int]:
        expert = sum(p.numel() for n, p in module.named_parameters() if n.endswith(("gate_up_proj", "down_proj")))
        return sum(p.numel() for p in module.parameters()) - expert, expert

    ranks_per_stage = ep * dp
    tokens_rank = global_batch_tokens // ranks_per_stage  # tokens per step through each rank of a stage
    sequences = global_batch_tokens // seq_len
    m = sequences // (ranks_per_stage * micro_batch)  # micro-batches per step per pipeline
    if m < 1:
        raise ValueError(f"global batch of {sequences} sequences is smaller than ep·dp·micro_batch")
    per_token = {moe: activation_elems_per_token(cfg, moe) for moe in (False, True)}
    rows = []
    for r in range(pp):
        stages = [s for s in range(n_stages) if owner(s) == r]
        layers = [i for s in stages for i in range(starts[s], starts[s] + sizes[s])]
        modules = [model.blocks[i] for i in layers]
        if 0 in stages:
            modules.append(model.embed)
        if n_stages - 1 in stages:
            modules += [model.norm, model.head, *model.mtp]
        dense = sum(dense_expert(mod)[0] for mod in modules)
        expert = sum(dense_expert(mod)[1] for mod in modules) // ep
        moe_layers = sum(cfg.is_moe_layer(i) for i in layers) + (cfg.num_nextn_predict_layers
                                                                 if n_stages - 1 in stages else 0)
        act_tok = sum(per_token[cfg.is_moe_layer(i)] for i in layers)
        act = 2 * micro_batch * seq_len * act_tok * in_flight(schedule, pp, m) // v
        a2a = int(2 * 2 * 2 * tokens_rank * moe_layers * cfg.num_experts_per_tok * D * (ep - 1) / ep)
        spans = [(starts[s], starts[s] + sizes[s] - 1) for s in stages if sizes[s]]  # inclusive, per stage
        rows.append({"rank": r, "stages": stages, "layers": spans,
                     "params": dense + expert, "param_bytes": 2 * (dense + expert),
                     "grad_bytes": 4 * (dense + expert),
                     "optimizer_bytes": 12 * (dense // ranks_per_stage + expert // dp),
                     "activation_bytes": act, "all_to_all_bytes": a2a})
    return {"world": pp * ep * dp, "pp": pp, "ep": ep, "dp": dp, "schedule": schedule, "stages": n_stages,
            "microbatches": m, "bubble": bubble_fraction(schedule, pp, m, v), "ranks": rows,
            "tokens_per_rank": tokens_rank}
