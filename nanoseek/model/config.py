"""Model configuration with HF `DeepseekV3Config` field names, so `config.json` round-trips with transformers.

`attention = "dsa"` is DeepSeek-V3.2: MLA plus the lightning indexer (`index_n_heads`, `index_head_dim`,
`index_topk`, HF `DeepseekV32Config` names), written as `model_type = "deepseek_v32"`.

Presets: `debug` (tests, <1M parameters), `micro` (the default run's distillation student), `mini` (the default
run's model), `tiny` (~12M), `small`, `base` (~0.6B, GPU) and `671B` (DeepSeek-V3 itself, configuration only).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any

# Ranges of the integer fields. The upper bounds lie far above any real model (DeepSeek-V3: vocabulary 129280,
# widths up to 18432, 61 layers, 128 heads, 256 experts, 163840 positions) and low enough that a typo fails here,
# naming the field, instead of asking for petabytes later (the inference cache grows with the context).
_WIDTH, _COUNT = 1 << 20, 1 << 12
_INT_RANGES: dict[str, tuple[int, int]] = {
    "vocab_size": (1, _WIDTH), "hidden_size": (1, _WIDTH), "intermediate_size": (1, _WIDTH),
    "moe_intermediate_size": (1, _WIDTH), "q_lora_rank": (1, _WIDTH), "kv_lora_rank": (1, _WIDTH),
    "qk_nope_head_dim": (1, _WIDTH), "qk_rope_head_dim": (1, _WIDTH), "v_head_dim": (1, _WIDTH),
    "num_hidden_layers": (1, _COUNT), "num_attention_heads": (1, _COUNT), "num_key_value_heads": (1, _COUNT),
    "n_shared_experts": (0, _COUNT), "n_routed_experts": (1, _COUNT), "num_experts_per_tok": (1, _COUNT),
    "n_group": (1, _COUNT), "topk_group": (1, _COUNT), "first_k_dense_replace": (0, _COUNT),
    "num_nextn_predict_layers": (0, _COUNT), "max_position_embeddings": (1, 1 << 24),
    "bos_token_id": (0, _WIDTH), "eos_token_id": (0, _WIDTH), "pad_token_id": (0, _WIDTH),
    "index_n_heads": (1, _COUNT), "index_head_dim": (1, _WIDTH), "index_topk": (1, 1 << 24),
}
ATTENTIONS = ("mla", "dsa")
_POSITIVE_FLOATS = ("rope_theta", "rms_norm_eps", "routed_scaling_factor")
_TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string", dict: "an object"}


@dataclass
class ModelConfig:
    vocab_size: int = 4096
    hidden_size: int = 256
    intermediate_size: int = 768  # dense SwiGLU width (first `first_k_dense_replace` layers)
    moe_intermediate_size: int = 128  # one routed expert; a shared expert is this × n_shared_experts
    num_hidden_layers: int = 6
    num_attention_heads: int = 4
    num_key_value_heads: int | None = None  # MLA has no GQA: always equals num_attention_heads
    n_shared_experts: int = 1
    n_routed_experts: int = 16
    num_experts_per_tok: int = 4
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = True
    first_k_dense_replace: int = 1
    q_lora_rank: int | None = None  # None -> plain q_proj (V2-Lite style)
    kv_lora_rank: int = 64
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 16
    v_head_dim: int = 32
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    # None or a YaRN dict: {"rope_type": "yarn", "factor", "original_max_position_embeddings",
    # "beta_fast", "beta_slow", "mscale", "mscale_all_dim"}
    rope_scaling: dict[str, Any] | None = None
    rope_interleave: bool = True
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.006  # the V3 paper's init std
    num_nextn_predict_layers: int = 1  # MTP depth D (0 disables MTP)
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    bos_token_id: int | None = 0
    eos_token_id: int | None = 1
    pad_token_id: int | None = None
    # DeepSeek Sparse Attention (V3.2): "dsa" adds a lightning indexer to every MLA layer, which scores all earlier
    # tokens with index_n_heads small ReLU heads of index_head_dim and lets each query attend to its index_topk best
    attention: str = "mla"  # "mla" | "dsa"
    index_n_heads: int = 64  # V3.2's sizes (also transformers' defaults); the small presets set their own
    index_head_dim: int = 128
    index_topk: int = 2048
    extra: dict[str, Any] = field(default_factory=dict)  # unknown HF fields, written back unchanged

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        self.validate()

    # --- derived sizes -------------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def is_moe_layer(self, layer_idx: int) -> bool:
        return layer_idx >= self.first_k_dense_replace

    def validate(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"model config: {name}={getattr(self, name)!r} {why}")

        self._check_types_and_ranges()
        if self.num_key_value_heads != self.num_attention_heads:
            raise bad("num_key_value_heads", f"must equal num_attention_heads={self.num_attention_heads} in MLA")
        if self.attention not in ATTENTIONS:
            raise bad("attention", f"expected one of {ATTENTIONS}")
        if self.attention == "dsa" and self.index_head_dim < self.qk_rope_head_dim:
            raise bad("index_head_dim", f"must be >= qk_rope_head_dim={self.qk_rope_head_dim} (its first "
                      "qk_rope_head_dim dims rotate)")
        if self.hidden_act != "silu":
            raise bad("hidden_act", "is unsupported (DeepSeek-V3 uses 'silu')")
        if self.qk_rope_head_dim % 2:
            raise bad("qk_rope_head_dim", "must be even")
        if self.n_routed_experts % self.n_group:
            raise bad("n_group", f"must divide n_routed_experts={self.n_routed_experts}")
        if not 1 <= self.topk_group <= self.n_group:
            raise bad("topk_group", f"must be in [1, n_group={self.n_group}]")
        if self.n_routed_experts // self.n_group < 2 and self.n_group > 1:
            raise bad("n_group", "must leave at least 2 experts per group (group score = sum of top-2)")
        if not 1 <= self.num_experts_per_tok <= self.n_routed_experts:
            raise bad("num_experts_per_tok", f"must be in [1, n_routed_experts={self.n_routed_experts}]")
        if self.tie_word_embeddings:
            raise bad("tie_word_embeddings", "is unsupported (DeepSeek-V3 unties embedding and head)")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if kind not in ("yarn", "default", None):
                raise ValueError(f"model config: rope_scaling.rope_type={kind!r} is unsupported (use 'yarn')")
            if kind == "yarn" and "factor" not in self.rope_scaling:
                raise ValueError("model config: rope_scaling.factor is required for YaRN")

    def _check_types_and_ranges(self) -> None:
        """Each field has its declared type (an int is not a bool, a string or 2.0) and a sane range: the checks
        every later computation relies on, so that a bad config.json fails here with the field's name."""
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value, hint = getattr(self, f.name), hints[f.name]
            if typing.get_origin(hint) in (typing.Union, types.UnionType):
                if value is None:
                    continue
                hint = next(a for a in typing.get_args(hint) if a is not type(None))
            hint = typing.get_origin(hint) or hint  # dict[str, Any] -> dict
            if hint is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
                raise ValueError(f"model config: {f.name}={value!r} must be {_TYPE_NAMES[hint]}")
            if f.name in _INT_RANGES:
                low, high = _INT_RANGES[f.name]
                if not low <= value <= high:
                    raise ValueError(f"model config: {f.name}={value} must be in [{low}, {high}]")
            if hint is float and not math.isfinite(value):
                raise ValueError(f"model config: {f.name}={value} must be finite")
        for name in _POSITIVE_FLOATS:
            if getattr(self, name) <= 0:
                raise ValueError(f"model config: {name}={getattr(self, name)} must be > 0")
        if self.initializer_range < 0:
            raise ValueError(f"model config: initializer_range={self.initializer_range} must be >= 0")
        if self.first_k_dense_replace > self.num_hidden_layers:
            raise ValueError(f"model config: first_k_dense_replace={self.first_k_dense_replace} exceeds "
                             f"num_hidden_layers={self.num_hidden_layers}")
        factor = (self.rope_scaling or {}).get("factor", 1.0)
        if isinstance(factor, bool) or not isinstance(factor, int | float) or not 0 < factor < math.inf:
            raise ValueError(f"model config: rope_scaling.factor={factor!r} must be a number > 0")

    @property
    def uses_yarn(self) -> bool:
        rs = self.rope_scaling
        return rs is not None and rs.get("rope_type", rs.get("type")) == "yarn"

    @property
    def softmax_scale(self) -> float:
        """(nope+rope)^-0.5, times mscale² under YaRN (mscale = 0.1·mscale_all_dim·ln(factor) + 1)."""
        scale = self.qk_head_dim**-0.5
        if self.uses_yarn:
            mscale_all_dim = self.rope_scaling.get("mscale_all_dim") or 0
            factor = self.rope_scaling["factor"]
            if mscale_all_dim and factor > 1:
                m = 0.1 * mscale_all_dim * math.log(factor) + 1.0
                scale *= m * m
        return scale

    # --- HF config.json round trip -------------------------------------------------------------
    def to_hf_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("extra", "rope_scaling")}
        dsa = d.pop("attention") == "dsa"  # the architecture says it: deepseek_v32 is MLA + indexer
        if not dsa:
            for name in _INDEX_FIELDS:
                d.pop(name)
        rope = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.uses_yarn:
            rope = {**{k: v for k, v in self.rope_scaling.items() if k != "type"}, "rope_type": "yarn",
                    "rope_theta": self.rope_theta}
        d.pop("rope_theta")
        d["rope_parameters"] = rope
        model_type, arch = ("deepseek_v32", "DeepseekV32ForCausalLM") if dsa else ("deepseek_v3",
                                                                                   "DeepseekV3ForCausalLM")
        d.update(model_type=model_type, architectures=[arch], torch_dtype="float32",
                 num_mtp_layers=self.num_nextn_predict_layers)
        d.pop("num_nextn_predict_layers")
        d["num_nextn_predict_layers"] = self.num_nextn_predict_layers  # DeepSeek's own name, kept for their tools
        return {**self.extra, **d}

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Accept transformers 5.x (`rope_parameters`) and DeepSeek's original (`rope_theta` + `rope_scaling`)."""
        if not isinstance(d, dict):
            raise ValueError(f"config.json: expected a JSON object, got {type(d).__name__}")
        d = dict(d)
        for key in ("rope_parameters", "rope_scaling"):
            if not isinstance(d.get(key) or {}, dict):
                raise ValueError(f"config.json: {key}={d[key]!r} must be an object")
        model_type = d.get("model_type", "deepseek_v3")
        if model_type not in _MODEL_TYPES:
            raise ValueError(f"config.json: model_type={model_type!r}, expected one of {tuple(_MODEL_TYPES)}")
        if "attention" in d:
            raise ValueError("config.json: 'attention' is not an HF field (model_type deepseek_v32 means DSA)")
        d["attention"] = _MODEL_TYPES[model_type]
        _check_layer_types(d)
        if d.get("topk_method", "noaux_tc") != "noaux_tc":
            raise ValueError(f"config.json: topk_method={d['topk_method']!r} is unsupported (expected 'noaux_tc')")
        if d.get("scoring_func", "sigmoid") != "sigmoid":
            raise ValueError(f"config.json: scoring_func={d['scoring_func']!r} is unsupported (expected 'sigmoid')")
        rope = d.pop("rope_parameters", None) or {}
        scaling = d.pop("rope_scaling", None) or {}
        theta = d.pop("rope_theta", rope.get("rope_theta", 10000.0))
        merged = {**scaling, **rope}
        merged.pop("rope_theta", None)
        if merged.get("rope_type", merged.get("type", "default")) in ("default", None):
            merged = {}
        mtp = d.pop("num_nextn_predict_layers", d.pop("num_mtp_layers", 0))
        d.pop("num_mtp_layers", None)
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in d.items() if k in names}
        extra = {k: v for k, v in d.items() if k not in names and k not in _DERIVED_HF_FIELDS}
        if isinstance(known.get("eos_token_id"), list):
            known["eos_token_id"] = known["eos_token_id"][0] if known["eos_token_id"] else None
        return cls(**known, rope_theta=theta, rope_scaling=merged or None, num_nextn_predict_layers=mtp, extra=extra)

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

_MODEL_TYPES = {"deepseek_v3": "mla", "deepseek_v32": "dsa"}  # model_type -> ModelConfig.attention
_INDEX_FIELDS = ("index_n_heads", "index_head_dim", "index_topk")


def _check_layer_types(d: dict[str, Any]) -> None:
    """transformers' V3.2 config spells out per-layer patterns that nanoseek derives: `mlp_layer_types` (the first
    first_k_dense_replace layers dense, then MoE) and `layer_types` (every layer indexed). Another pattern is a
    model nanoseek cannot build: refuse it rather than silently build a different one."""
    layers, k = d.get("num_hidden_layers", 6), d.get("first_k_dense_replace", 1)
    if isinstance(layers, int) and isinstance(k, int):
        mlp = d.get("mlp_layer_types")
        if mlp is not None and mlp != ["dense"] * min(k, layers) + ["sparse"] * max(layers - k, 0):
            raise ValueError(f"config.json: mlp_layer_types={mlp!r} is not first_k_dense_replace={k} dense layers "
                             "then MoE (the only pattern nanoseek builds)")
    kinds = set(d.get("layer_types") or [])
    if kinds - {"indexed_attention"}:
        raise ValueError(f"config.json: layer_types {sorted(kinds)} are unsupported (every layer of DeepSeek-V3.2 "
                         "is 'indexed_attention')")


# Fields transformers writes that follow from others (or describe the runtime); dropped when reading.
_DERIVED_HF_FIELDS = {
    "model_type", "architectures", "torch_dtype", "dtype", "transformers_version", "qk_head_dim", "head_dim",
    "num_local_experts", "output_router_logits", "use_cache", "pretraining_tp", "attention_dropout",
    "topk_method", "scoring_func", "aux_loss_alpha", "seq_aux", "ep_size", "moe_layer_freq",
    "mlp_layer_types", "layer_types",  # checked by _check_layer_types
}


# V3's init std (0.006) suits its 7168-wide layers; at widths of 64-1024 it leaves attention logits near zero
# and the small models fail to learn even to copy a token for hundreds of steps. They use the common 0.02.
SMALL_INIT_STD = 0.02

# Each small preset carries an indexer for `attention = "dsa"` (unused under MLA), scaled down from V3.2's 64 heads
# of 128 and top-2048 of a 128K context.
PRESETS: dict[str, dict[str, Any]] = {
    # Tests: well under 1M parameters, every feature on (q low-rank, 2 groups, dense + MoE layers, MTP).
    "debug": dict(vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                  num_hidden_layers=2, num_attention_heads=2, n_routed_experts=8, num_experts_per_tok=2,
                  n_group=2, topk_group=1, first_k_dense_replace=1, q_lora_rank=32, kv_lora_rank=32,
                  qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, routed_scaling_factor=1.0,
                  max_position_embeddings=512, initializer_range=SMALL_INIT_STD,
                  index_n_heads=4, index_head_dim=16, index_topk=16),
    # A bigger CPU model than mini (~12M parameters with a 4K vocabulary); the preset a [model] table without one gets.
    "tiny": dict(vocab_size=4096, hidden_size=256, intermediate_size=768, moe_intermediate_size=128,
                 num_hidden_layers=6, num_attention_heads=4, n_routed_experts=16, num_experts_per_tok=4,
                 n_group=1, topk_group=1, first_k_dense_replace=1, q_lora_rank=None, kv_lora_rank=64,
                 qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, max_position_embeddings=2048,
                 initializer_range=SMALL_INIT_STD, index_n_heads=4, index_head_dim=32, index_topk=256),
    # The default run's model (recipes/tiny.toml; ~1.5M parameters with a 2K vocabulary): a quarter of tiny's width.
    "mini": dict(vocab_size=2048, hidden_size=128, intermediate_size=384, moe_intermediate_size=64,
                 num_hidden_layers=4, num_attention_heads=4, n_routed_experts=8, num_experts_per_tok=2,
                 n_group=1, topk_group=1, first_k_dense_replace=1, q_lora_rank=None, kv_lora_rank=32,
                 qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, max_position_embeddings=2048,
                 initializer_range=SMALL_INIT_STD, index_n_heads=4, index_head_dim=16, index_topk=128),
    # The default run's student for distillation (~0.4M parameters with a 2K vocabulary): half of mini's width.
    "micro": dict(vocab_size=2048, hidden_size=64, intermediate_size=192, moe_intermediate_size=32,
                  num_hidden_layers=4, num_attention_heads=4, n_routed_experts=8, num_experts_per_tok=2,
                  n_group=1, topk_group=1, first_k_dense_replace=1, q_lora_rank=None, kv_lora_rank=32,
                  qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, max_position_embeddings=2048,
                  initializer_range=SMALL_INIT_STD, index_n_heads=4, index_head_dim=16, index_topk=128),
    # A bigger CPU run.
    "small": dict(vocab_size=8192, hidden_size=512, intermediate_size=1536, moe_intermediate_size=256,
                  num_hidden_layers=8, num_attention_heads=8, n_routed_experts=32, num_experts_per_tok=4,
                  n_group=4, topk_group=2, first_k_dense_replace=1, q_lora_rank=192, kv_lora_rank=128,
                  qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, routed_scaling_factor=2.5,
                  max_position_embeddings=4096, initializer_range=SMALL_INIT_STD,
                  index_n_heads=8, index_head_dim=64, index_topk=512),
    # A single-GPU model (~0.7B total parameters).
    "base": dict(vocab_size=32768, hidden_size=1024, intermediate_size=4096, moe_intermediate_size=512,
                 num_hidden_layers=16, num_attention_heads=16, n_routed_experts=64, num_experts_per_tok=6,
                 n_group=8, topk_group=4, first_k_dense_replace=1, q_lora_rank=384, kv_lora_rank=256,
                 qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, routed_scaling_factor=2.5,
                 max_position_embeddings=4096, initializer_range=SMALL_INIT_STD,
                 index_n_heads=16, index_head_dim=64, index_topk=1024),
    # DeepSeek-V3 as released (configuration only).
    "671B": dict(vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
                 num_hidden_layers=61, num_attention_heads=128, n_routed_experts=256, num_experts_per_tok=8,
                 n_group=8, topk_group=4, first_k_dense_replace=3, q_lora_rank=1536, kv_lora_rank=512,
                 qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, routed_scaling_factor=2.5,
                 max_position_embeddings=163840, num_nextn_predict_layers=1,
                 rope_scaling={"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096,
                               "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known: {', '.join(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides})
