"""Checkpoint format = HF DeepseekV3 on disk: `config.json` + `model.safetensors` (or sharded with an index).

nanoseek's module names are short (`blocks.3.attn.kv_a_proj`); on disk they take HF/DeepSeek names
(`model.layers.3.self_attn.kv_a_proj_with_mqa`), routed experts one by one (`mlp.experts.7.gate_proj`), and MTP
module k at layer index num_hidden_layers + k - 1 with its `enorm/hnorm/eh_proj/shared_head`, as DeepSeek ships it.
Loading reads safetensors only (never pickles) and refuses, naming the file and the tensor, anything it cannot trust:
an unreadable (truncated, corrupt) file, a missing or unexpected tensor, a shape that disagrees with config.json, a
non-floating dtype, NaN or infinite weights.

A run directory keeps its checkpoints as RUN/checkpoints/step_N/. A save writes `.tmp_step_N` and renames it when
complete, so the name `step_N` alone means complete: `list_checkpoints` is the one definition, which loading,
resuming and pruning all use.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from nanoseek.common import atomic_write, write_json
from nanoseek.model.config import ModelConfig
from nanoseek.model.rope import Rotary
from nanoseek.model.transformer import Transformer

# nanoseek name segment -> HF name segment, inside a block
_SEGMENTS = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn": "self_attn", "ffn": "mlp",
    "q_a_norm": "q_a_layernorm", "kv_a_norm": "kv_a_layernorm", "kv_a_proj": "kv_a_proj_with_mqa",
}
_SEGMENTS_BACK = {v: k for k, v in _SEGMENTS.items()}
_EXPERTS = re.compile(r"(.*)\.experts\.(gate_up_proj|down_proj)$")

CHECKPOINTS = "checkpoints"  # RUN/checkpoints/step_N/
STEP_DIR = re.compile(r"^step_(\d+)$")
# weights nanoseek computes with; anything else (integers, FP8 without its scales) is not a model it can run
WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _block_to_hf(rest: str) -> str:
    return ".".join(_SEGMENTS.get(s, s) for s in rest.split("."))


def _block_from_hf(rest: str) -> str:
    return ".".join(_SEGMENTS_BACK.get(s, s) for s in rest.split("."))


def to_hf_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """nanoseek state dict -> HF/DeepSeek tensor names and per-expert layout (MTP included)."""
    cfg = model.config
    L = cfg.num_hidden_layers
    out: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        t = t.detach()
        if name == "embed.weight":
            hf = "model.embed_tokens.weight"
        elif name == "norm.weight":
            hf = "model.norm.weight"
        elif name == "head.weight":
            hf = "lm_head.weight"
        elif name.startswith("blocks."):
            _, i, rest = name.split(".", 2)
            hf = f"model.layers.{i}.{_block_to_hf(rest)}"
        elif name.startswith("mtp."):
            _, k, rest = name.split(".", 2)
            layer = f"model.layers.{L + int(k)}"
            if rest.startswith("block."):
                hf = f"{layer}.{_block_to_hf(rest[len('block.'):])}"
            elif rest == "norm.weight":
                hf = f"{layer}.shared_head.norm.weight"
            else:
                hf = f"{layer}.{rest}"
        else:
            raise KeyError(f"no HF name for parameter {name!r}")
        m = _EXPERTS.match(hf)
        if m:  # fused [E, 2I, D] / [E, D, I] -> one tensor per expert and projection
            prefix, kind = m.groups()
            for e in range(t.shape[0]):
                if kind == "gate_up_proj":
                    gate, up = t[e].chunk(2, dim=0)
                    out[f"{prefix}.experts.{e}.gate_proj.weight"] = gate
                    out[f"{prefix}.experts.{e}.up_proj.weight"] = up
                else:
                    out[f"{prefix}.experts.{e}.down_proj.weight"] = t[e]
            continue
        out[hf] = t
    for k in range(cfg.num_nextn_predict_layers):  # DeepSeek's MTP layers carry (shared) copies of embed and head
        out[f"model.layers.{L + k}.embed_tokens.weight"] = out["model.embed_tokens.weight"]
        out[f"model.layers.{L + k}.shared_head.head.weight"] = out["lm_head.weight"]
    return {k: v.contiguous() for k, v in out.items()}


def from_hf_state_dict(cfg: ModelConfig, tensors: dict[str, torch.Tensor], where: str = "") -> dict[str, torch.Tensor]:
    """HF/DeepSeek names -> nanoseek state dict; accepts per-expert or fused (transformers in-memory) experts.
    MTP layers are read when cfg.num_nextn_predict_layers > 0 and ignored otherwise."""
    L, D = cfg.num_hidden_layers, cfg.num_nextn_predict_layers
    out: dict[str, torch.Tensor] = {}
    experts: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    for hf, t in tensors.items():
        if hf.endswith("weight_scale_inv"):
            raise ValueError(f"{where}: {hf}: FP8 block-quantised checkpoints must be dequantised to bf16/fp32 first")
        if hf == "model.embed_tokens.weight":
            out["embed.weight"] = t
            continue
        if hf == "model.norm.weight":
            out["norm.weight"] = t
            continue
        if hf == "lm_head.weight":
            out["head.weight"] = t
            continue
        m = re.match(r"model\.layers\.(\d+)\.(.+)$", hf)
        if not m:
            raise ValueError(f"{where}: unexpected tensor {hf!r}")
        i, rest = int(m.group(1)), m.group(2)
        if i < L:
            prefix = f"blocks.{i}."
        elif i < L + D:
            prefix = f"mtp.{i - L}."
            if rest in ("embed_tokens.weight", "shared_head.head.weight"):
                continue  # shared with the main model
            if rest == "shared_head.norm.weight":
                out[prefix + "norm.weight"] = t
                continue
            if rest.split(".")[0] in ("enorm", "hnorm", "eh_proj"):
                out[prefix + rest] = t
                continue
            prefix += "block."
        else:
            continue  # MTP layers beyond the configured depth
        e = re.match(r"mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$", rest)
        if e:
            experts.setdefault(prefix + "ffn.experts.", {}).setdefault(int(e.group(1)), {})[e.group(2)] = t
            continue
        out[prefix + _block_from_hf(rest)] = t
    n, width, inner = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
    shapes = {"gate_proj": (inner, width), "up_proj": (inner, width), "down_proj": (width, inner)}
    for prefix, per_expert in experts.items():
        missing = [f"{e}.{p}" for e in range(n) for p in shapes if p not in per_expert.get(e, {})]
        if missing:
            raise ValueError(f"{where}: missing expert tensors under {prefix}: {missing[:4]}...")
        if max(per_expert) >= n:
            raise ValueError(f"{where}: expert {max(per_expert)} under {prefix}, but config.json has "
                             f"n_routed_experts={n}")
        for e, projections in per_expert.items():  # checked before stacking, which would fail without a name
            for p, t in projections.items():
                if tuple(t.shape) != shapes[p]:
                    raise ValueError(f"{where}: tensor {prefix}{e}.{p} has shape {tuple(t.shape)}, expected "
                                     f"{shapes[p]} from config.json")
        out[prefix + "gate_up_proj"] = torch.stack(
            [torch.cat([per_expert[e]["gate_proj"], per_expert[e]["up_proj"]]) for e in range(n)])
        out[prefix + "down_proj"] = torch.stack([per_expert[e]["down_proj"] for e in range(n)])
    return out


def save_pretrained(model: Transformer, path: str | Path, extra_files: dict[str, dict] | None = None) -> Path:
    """Write config.json + model.safetensors (+ extra JSON files) so that both `nanoseek.load` and
    `transformers.AutoModelForCausalLM.from_pretrained` read the directory."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = to_hf_state_dict(model)
    # safetensors refuses tensors sharing memory: give the MTP copies of embed/head storage of their own
    tensors = {k: (v.clone() if ("shared_head.head" in k or k.endswith("embed_tokens.weight")
                                 and k != "model.embed_tokens.weight") else v) for k, v in tensors.items()}
    atomic_write(path / "model.safetensors", lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    config = model.config.to_hf_dict()
    config["torch_dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")
    write_json(path / "config.json", config)
    for name, data in (extra_files or {}).items():
        write_json(path / name, data)
    return path


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first: the `step_N` directories under RUN/checkpoints/. Temporary
    directories of saves in progress or interrupted (`.tmp_step_N`, `.old_step_N`) are never listed."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint dir (has config.json), or a run dir: its latest complete checkpoint, else its model/."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint or run directory")
    if (path / "config.json").exists():
        return path
    ckpts = list_checkpoints(path)
    if ckpts:
        return ckpts[-1]
    if (path / "model" / "config.json").exists():
        return path / "model"
    raise FileNotFoundError(f"{path}: neither a checkpoint (config.json) nor a run directory with checkpoints/")


def read_tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory: model.safetensors, a sharded index, or every *.safetensors.
    A file safetensors cannot read, a non-floating dtype or a NaN/inf value is a ValueError naming the file."""
    index = ckpt / "model.safetensors.index.json"
    if index.exists():
        try:
            files = sorted({ckpt / f for f in json.loads(index.read_text())["weight_map"].values()})
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{index}: not a safetensors index with a weight_map ({e!r})") from e
    elif (ckpt / "model.safetensors").exists():
        files = [ckpt / "model.safetensors"]
    else:
        files = sorted(ckpt.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{ckpt}: no safetensors weights (nanoseek never loads pickled .bin files)")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        if not f.exists():
            raise FileNotFoundError(f"{index}: names shard {f.name}, which is missing")
        try:
            with safe_open(str(f), framework="pt") as sf:
                found = {k: sf.get_tensor(k) for k in sf.keys()}
        except SafetensorError as e:
            raise ValueError(f"{f}: unreadable safetensors file, truncated or corrupt ({e})") from e
        for k, t in found.items():
            if t.dtype not in WEIGHT_DTYPES:
                raise ValueError(f"{f}: tensor {k!r} has dtype {str(t.dtype).removeprefix('torch.')}; nanoseek "
                                 f"loads float32, bfloat16, float16 or float64 weights (dequantise FP8 first)")
            if not torch.isfinite(t).all():
                raise ValueError(f"{f}: tensor {k!r} holds NaN or infinite values")
        tensors.update(found)
    return tensors


def check_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor], where: str | Path) -> None:
    """Refuse a checkpoint whose tensors are not exactly the model's (built from its config.json): a missing or
    unexpected name, or a shape that disagrees, named with the file it came from."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    if missing:
        raise ValueError(f"{where}: missing tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    for name, t in state.items():
        if name not in expected:
            raise ValueError(f"{where}: unexpected tensor {name!r}")
        if t.shape != expected[name].shape:
            raise ValueError(f"{where}: tensor {name!r} has shape {tuple(t.shape)}, "
                             f"expected {tuple(expected[name].shape)} from config.json")

def load(path: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> Transformer:
    """A model from a nanoseek checkpoint, a run directory (its latest checkpoint) or an HF DeepseekV3 directory;
    a VL checkpoint (config.json's model_type "nanoseek_vl") gives its `nanoseek.model.vl.VLModel`."""
    ckpt = resolve_checkpoint(path)
    from nanoseek.model.vl import is_vl_checkpoint, load_vl  # vl builds on this module

    if is_vl_checkpoint(ckpt):
        return load_vl(ckpt, dtype=dtype, device=device)
    try:
        cfg = ModelConfig.from_hf_dict(json.loads((ckpt / "config.json").read_text()))
    except (ValueError, TypeError) as e:
        raise ValueError(f"{ckpt / 'config.json'}: {e}") from e
    tensors = read_tensors(ckpt)
    L = cfg.num_hidden_layers
    present = {int(m.group(1)) for k in tensors if (m := re.match(r"model\.layers\.(\d+)\.", k))}
    depth = next((k for k in range(cfg.num_nextn_predict_layers) if L + k not in present),
                 cfg.num_nextn_predict_layers)
    if depth < cfg.num_nextn_predict_layers:  # transformers drops MTP weights: load the main model alone
        cfg = cfg.replace(num_nextn_predict_layers=depth)
    state = from_hf_state_dict(cfg, tensors, where=str(ckpt))
    with torch.device("meta"):
        model = Transformer(cfg)
    check_state_dict(model, state, ckpt)
    model.load_state_dict(state, assign=True)
    model.rotary = Rotary(cfg)  # its buffer is derived, not stored: rebuild it off the meta device
    for moe in model.moe_layers():
        moe.gate.e_score_correction_bias.data = moe.gate.e_score_correction_bias.data.float()
    if dtype is not None:
        model.to(dtype)
    return model.to(device).eval()
