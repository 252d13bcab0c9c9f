"""SigLIP vision encoder (the tower of DeepSeek-VL2), loading from and saving to a transformers `siglip_vision_model`
directory.

A [B, 3, H, W] image in [-1, 1] is cut into P×P patches by a stride-P convolution, each patch gets a learned
position embedding (one per grid cell: no class token), and a stack of pre-LayerNorm encoder layers (bidirectional
multi-head attention with biases, a GELU-tanh MLP) turns the (H/P)·(W/P) patches into features [B, N, D] after a
final LayerNorm. The optional attention-pooling head (`vision_use_head`) reduces them to one vector per image; the
VL projector reads the patch features, the head is kept so that SigLIP checkpoints load whole and save unchanged.

Module names equal transformers' (`encoder.layers.3.self_attn.q_proj`), so the on-disk format is the state dict
itself; checkpoints written by transformers 4 carry a `vision_model.` prefix, which loading strips.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from nanoseek.common import atomic_write, write_json

MODEL_TYPE = "siglip_vision_model"
_INTS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_channels",
         "image_size", "patch_size")


@dataclass
class VisionConfig:
    """transformers' `SiglipVisionConfig` fields (same names, same defaults apart from the sizes of a small tower)."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 16
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6
    attention_dropout: float = 0.0
    vision_use_head: bool = True
    extra: dict[str, Any] = field(default_factory=dict)  # unknown HF fields, written back unchanged

    def __post_init__(self) -> None:
        for name in _INTS:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"vision config: {name}={v!r} must be a positive integer")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"vision config: hidden_size={self.hidden_size} must be divisible by "
                             f"num_attention_heads={self.num_attention_heads}")
        if self.image_size % self.patch_size:
            raise ValueError(f"vision config: image_size={self.image_size} must be a multiple of "
                             f"patch_size={self.patch_size}")
        if self.hidden_act not in _ACTS:
            raise ValueError(f"vision config: hidden_act={self.hidden_act!r} is unsupported; expected one of "
                             f"{sorted(_ACTS)}")

    @property
    def grid(self) -> int:
        """Patches per side: the features form a grid × grid square."""
        return self.image_size // self.patch_size

    def to_hf_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in dataclasses.asdict(self).items() if k != "extra"}
        return {**self.extra, **d, "model_type": MODEL_TYPE, "architectures": ["SiglipVisionModel"]}

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> VisionConfig:
        if d.get("model_type", MODEL_TYPE) != MODEL_TYPE:
            raise ValueError(f"model_type={d.get('model_type')!r}, expected {MODEL_TYPE!r}")
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in d.items() if k in known}
        for k in ("image_size", "patch_size"):  # HF allows [h, w]; nanoseek's grid is square
            if isinstance(kwargs.get(k), (list, tuple)):
                if len(set(kwargs[k])) != 1:
                    raise ValueError(f"{k}={kwargs[k]!r}: only square images and patches are supported")
                kwargs[k] = kwargs[k][0]
        extra = {k: v for k, v in d.items() if k not in known and k not in ("model_type", "architectures")}
        return cls(**kwargs, extra=extra)


_ACTS = {"gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"), "gelu": F.gelu}


class MLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.act = _ACTS[cfg.hidden_act]
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
    """Bidirectional multi-head self-attention over the patches (every patch sees every patch)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.heads = cfg.num_attention_heads
        D = cfg.hidden_size
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(D, D) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        q, k, v = (p(x).view(B, N, self.heads, D // self.heads).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))  # [B, H, N, D/H]
        out = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(out.transpose(1, 2).reshape(B, N, D))


class EncoderLayer(nn.Module):
    """x + attn(LN(x)), then + MLP(LN(x))."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = Attention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class Embeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size)
        self.position_embedding = nn.Embedding(cfg.grid ** 2, cfg.hidden_size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype))  # [B, D, g, g]
        return x.flatten(2).transpose(1, 2) + self.position_embedding.weight  # [B, g·g, D], row-major grid


class Encoder(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))


class PoolingHead(nn.Module):
    """Multi-head attention pooling: a learned probe attends over the patches, then a residual MLP."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.probe = nn.Parameter(torch.zeros(1, 1, cfg.hidden_size))
        self.attention = nn.MultiheadAttention(cfg.hidden_size, cfg.num_attention_heads, batch_first=True)
        self.layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.attention(self.probe.expand(x.shape[0], -1, -1), x, x, need_weights=False)[0]
        return (h + self.mlp(self.layernorm(h)))[:, 0]


class VisionEncoder(nn.Module):
    """pixels [B, C, S, S] in [-1, 1] -> patch features [B, (S/P)², D]; `pool` gives the head's [B, D]."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = Embeddings(cfg)
        self.encoder = Encoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.head = PoolingHead(cfg) if cfg.vision_use_head else None
        self.init_weights()

    @torch.no_grad()
    def init_weights(self, std: float = 0.02) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d, nn.Embedding)):
                nn.init.normal_(m.weight, 0.0, std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if self.head is not None:
            nn.init.normal_(self.head.probe, 0.0, std)
            nn.init.normal_(self.head.attention.in_proj_weight, 0.0, std)
            nn.init.zeros_(self.head.attention.in_proj_bias)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(pixels)
        for layer in self.encoder.layers:
            x = layer(x)
        return self.post_layernorm(x)

    def pool(self, features: torch.Tensor) -> torch.Tensor:
        if self.head is None:
            raise ValueError("this vision tower has no pooling head (vision_use_head = false)")
        return self.head(features)


# ----- images -> pixels


def to_pixels(images, size: int) -> torch.Tensor:
    """PIL images -> [B, 3, size, size] float in [-1, 1]: RGB, bicubic resize, (x/255 - 0.5) / 0.5 — SigLIP's
    image processor (mean = std = 0.5)."""
    from PIL import Image

    out = []
    for im in images:
        im = im.convert("RGB")
        if im.size != (size, size):
            im = im.resize((size, size), Image.Resampling.BICUBIC)
        out.append(np.asarray(im, dtype=np.float32))
    x = torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2)
    return x / 127.5 - 1.0


# ----- the transformers directory format


def save_vision(model: VisionEncoder, path: str | Path) -> Path:
    """config.json + model.safetensors that `transformers.SiglipVisionModel.from_pretrained` reads."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    atomic_write(path / "model.safetensors", lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    config = model.config.to_hf_dict()
    config["dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")
    write_json(path / "config.json", config)
    return path


def load_vision(path: str | Path, tensors: dict[str, torch.Tensor] | None = None) -> VisionEncoder:
    """A SigLIP vision tower from a transformers directory; `tensors` are its weights when already read (the
    project's reader checks them: see nanoseek.model.hf.read_tensors). Missing, unexpected or misshapen tensors
    are errors naming the tensor."""
    from nanoseek.model.hf import check_state_dict, read_tensors

    path = Path(path)
    try:
        cfg = VisionConfig.from_hf_dict(json.loads((path / "config.json").read_text()))
    except (ValueError, TypeError, OSError) as e:
        raise ValueError(f"{path / 'config.json'}: {e}") from e
    tensors = read_tensors(path) if tensors is None else tensors
    state = {k.removeprefix("vision_model."): v for k, v in tensors.items()}
    with torch.device("meta"):
        model = VisionEncoder(cfg)
    check_state_dict(model, state, path)
    model.load_state_dict(state, assign=True)
    return model.eval()
