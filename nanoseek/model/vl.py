"""The vision-language model (DeepSeek-VL2's design on nanoseek's DeepSeek-V3): SigLIP tower -> 2×2 pixel shuffle
-> 2-layer GELU MLP projector -> image features written over the `<image>` placeholder ids of the language model.

    pixels [n, 3, S, S] --SigLIP--> [n, g², Dv] --shuffle 2×2--> [n, (g/2)², 4·Dv] --MLP--> [n, (g/2)², D]

The projector is DeepSeek-VL2's `downsample_mlp_gelu` (depth 2): the 2×2 neighbourhood of patches is concatenated
(F.unfold, channel-major like theirs) so one language token carries four patches, a quarter of the sequence.
`VLModel` is a `Transformer` whose token embedding substitutes the projected features at the placeholder positions
of the next forward that holds placeholders, in order; everything built on the language model (training losses,
MTP, the latent-cache decode, generation) runs unchanged on a VL model, which only adds `images=` to forward,
forward_cached and generate.

A VL checkpoint is a directory that ties three standard parts together:
    DIR/config.json            {"model_type": "nanoseek_vl", image_token_id, projector sizes, part directories}
    DIR/language_model/        the language model in HF DeepseekV3 format (`nanoseek.model.hf`)
    DIR/vision_tower/          the tower in transformers' siglip_vision_model format (`nanoseek.model.vision`)
    DIR/projector/model.safetensors  `layers.0.weight` ... as DeepSeek-VL2 names them
`nanoseek.load(DIR)` returns the VLModel; a text-only checkpoint loads as before.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from nanoseek.common import atomic_write, write_json
from nanoseek.model.config import ModelConfig, preset
from nanoseek.model.transformer import Transformer
from nanoseek.model.vision import VisionConfig, VisionEncoder, load_vision, save_vision

MODEL_TYPE = "nanoseek_vl"
LANGUAGE_DIR, VISION_DIR, PROJECTOR_DIR = "language_model", "vision_tower", "projector"


@dataclass
class VLConfig:
    language: ModelConfig
    vision: VisionConfig
    image_token_id: int
    downsample_ratio: int = 2  # pixel shuffle: ratio × ratio patches per language token
    mlp_ratio: int = 1  # projector hidden width = mlp_ratio × language hidden size
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 0 <= self.image_token_id < self.language.vocab_size:
            raise ValueError(f"vl config: image_token_id={self.image_token_id} must be a language-model id "
                             f"(vocab_size={self.language.vocab_size})")
        for name in ("downsample_ratio", "mlp_ratio"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"vl config: {name}={getattr(self, name)!r} must be a positive integer")

    @property
    def image_tokens(self) -> int:
        """Language tokens per image: the patch grid after the pixel shuffle (padded up to a multiple)."""
        side = -(-self.vision.grid // self.downsample_ratio)
        return side * side

    def to_dict(self) -> dict[str, Any]:
        return {**self.extra, "model_type": MODEL_TYPE, "architectures": ["NanoseekVL"],
                "image_token_id": self.image_token_id, "downsample_ratio": self.downsample_ratio,
                "mlp_ratio": self.mlp_ratio, "projector_type": "downsample_mlp_gelu", "projector_depth": 2,
                "image_tokens": self.image_tokens, "language_model": LANGUAGE_DIR, "vision_tower": VISION_DIR,
                "projector": PROJECTOR_DIR}


# Tiny towers for CPU runs: the language side is a text preset; the tower sees 64×64 images as an 8×8 grid
# (16 language tokens per image after the shuffle).
VL_PRESETS: dict[str, dict[str, Any]] = {
    "vl-debug": dict(language="debug", vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                   num_attention_heads=2, image_size=32, patch_size=8,
                                                   vision_use_head=False)),
    "vl-tiny": dict(language="micro", vision=dict(hidden_size=96, intermediate_size=192, num_hidden_layers=3,
                                                  num_attention_heads=4, image_size=64, patch_size=8,
                                                  vision_use_head=False)),
}


def vl_preset(name: str, image_token_id: int, language: ModelConfig | None = None) -> VLConfig:
    """A VL preset's config; `language` (an existing language model's config) replaces the preset's."""
    if name not in VL_PRESETS:
        raise ValueError(f"unknown VL preset {name!r}; known: {', '.join(VL_PRESETS)}")
    p = VL_PRESETS[name]
    return VLConfig(language or preset(p["language"]), VisionConfig(**p["vision"]), image_token_id)


class Projector(nn.Module):
    """[n, g², Dv] patch features -> [n, (g/r)², D] language embeddings: r×r pixel shuffle, Linear, GELU, Linear."""

    def __init__(self, cfg: VLConfig):
        super().__init__()
        self.ratio = cfg.downsample_ratio
        r, width = cfg.downsample_ratio, cfg.language.hidden_size * cfg.mlp_ratio
        self.layers = nn.Sequential(nn.Linear(cfg.vision.hidden_size * r * r, width), nn.GELU(),
                                    nn.Linear(width, cfg.language.hidden_size))

    def shuffle(self, x: torch.Tensor) -> torch.Tensor:
        """[n, g², C] -> [n, (g/r)², C·r²]: each output cell concatenates an r×r block (zero-padded at the edge)."""
        n, hw, C = x.shape
        g, r = int(round(hw ** 0.5)), self.ratio
        x = x.reshape(n, g, g, C)
        pad = -g % r
        if pad:
            x = F.pad(x, (0, 0, 0, pad, 0, pad))
        x = F.unfold(x.permute(0, 3, 1, 2), kernel_size=r, stride=r)  # [n, C·r², (g/r)²]
        return x.transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(self.shuffle(x))


class ImageEmbedding(nn.Embedding):
    """Token embedding that writes pending image features over the image-token positions. Features are set by
    `VLModel` and consumed by the first forward whose ids hold placeholders (the prefill, never a decode step)."""

    def __init__(self, num: int, dim: int, image_token_id: int):
        super().__init__(num, dim)
        self.image_token_id = image_token_id
        self.pending: torch.Tensor | None = None  # [n_placeholders, D]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = super().forward(ids)
        if self.pending is None:
            return x
        mask = ids == self.image_token_id
        n = int(mask.sum())
        if n == 0:
            return x
        feats, self.pending = self.pending, None
        if n != feats.shape[0]:
            raise ValueError(f"the ids hold {n} image placeholder tokens, the images give {feats.shape[0]} "
                             f"features (one <image> per image, expanded to the tower's tokens per image)")
        return x.masked_scatter(mask[..., None], feats.to(x.dtype))


class VLModel(Transformer):
    """The language model with a vision tower and projector; `images` [n, 3, S, S] in [-1, 1] (`to_pixels`),
    one per `<image>` placeholder in reading order across the batch."""

    def __init__(self, cfg: VLConfig):
        super().__init__(cfg.language)
        self.vl_config = cfg
        self.embed = ImageEmbedding(cfg.language.vocab_size, cfg.language.hidden_size, cfg.image_token_id)
        nn.init.normal_(self.embed.weight, 0.0, cfg.language.initializer_range)
        self.vision = VisionEncoder(cfg.vision)
        self.projector = Projector(cfg)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """[n, 3, S, S] -> [n · image_tokens, D], the rows the placeholders take."""
        return self.projector(self.vision(images)).flatten(0, 1)

    def _attach(self, images: torch.Tensor | None) -> None:
        """Features for the next forward with placeholders (generate attaches once, for its prefill)."""
        if images is not None and len(images):
            self.embed.pending = self.encode_images(images)

    def _check_consumed(self) -> None:
        if self.embed.pending is not None:
            self.embed.pending = None
            raise ValueError("images were given but the ids hold no <image> placeholder tokens")

    def forward(self, input_ids: torch.Tensor, extras: bool = False, key_mask: torch.Tensor | None = None,
                hidden: bool = False, images: torch.Tensor | None = None):
        self._attach(images)
        try:
            return super().forward(input_ids, extras, key_mask, hidden)
        finally:
            self._check_consumed()

    def forward_cached(self, input_ids: torch.Tensor, cache, start: int, key_mask: torch.Tensor | None = None,
                       positions: torch.Tensor | None = None, hidden: bool = False,
                       images: torch.Tensor | None = None) -> torch.Tensor:
        self._attach(images)
        try:
            return super().forward_cached(input_ids, cache, start, key_mask, positions, hidden)
        finally:
            self._check_consumed()

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 32, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None, eos_token_id: int | None = None,
                 seed: int | None = None, images: torch.Tensor | None = None) -> torch.Tensor:
        """As Transformer.generate; the images fill the prompt's placeholders during the prefill."""
        self._attach(images)
        try:
            return super().generate(input_ids, max_new_tokens, temperature, top_k, top_p, eos_token_id, seed)
        finally:
            self._check_consumed()

    def language_model(self) -> Transformer:
        """A plain Transformer sharing this model's language weights (for text-only evaluation and export)."""
        with torch.device("meta"):
            lm = Transformer(self.config)
        lm.load_state_dict({k: v for k, v in self.state_dict().items()
                            if not k.startswith(("vision.", "projector."))}, assign=True)
        lm.rotary = self.rotary
        return lm

    def save_pretrained(self, path: str | Path, extra_files: dict[str, dict] | None = None) -> Path:
        return save_vl(self, path, extra_files)


def save_vl(model: VLModel, path: str | Path, extra_files: dict[str, dict] | None = None) -> Path:
    """The VL checkpoint directory (module docstring); its parts load in transformers as they are."""
    from nanoseek.model.hf import save_pretrained

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_pretrained(model.language_model(), path / LANGUAGE_DIR)
    save_vision(model.vision, path / VISION_DIR)
    tensors = {k: v.detach().contiguous() for k, v in model.projector.state_dict().items()}
    (path / PROJECTOR_DIR).mkdir(exist_ok=True)
    atomic_write(path / PROJECTOR_DIR / "model.safetensors",
                 lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    write_json(path / "config.json", model.vl_config.to_dict())
    for name, data in (extra_files or {}).items():
        write_json(path / name, data)
    return path


def is_vl_checkpoint(ckpt: Path) -> bool:
    try:
        return json.loads((Path(ckpt) / "config.json").read_text()).get("model_type") == MODEL_TYPE
    except (OSError, ValueError, AttributeError):
        return False


def load_vl(ckpt: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> VLModel:
    """A VLModel from its checkpoint directory: each part through its own loader (and its checks)."""
    from nanoseek.model.hf import check_state_dict, load, read_tensors

    ckpt = Path(ckpt)
    d = json.loads((ckpt / "config.json").read_text())
    lm = load(ckpt / d.get("language_model", LANGUAGE_DIR))
    vision = load_vision(ckpt / d.get("vision_tower", VISION_DIR))
    known = {"image_token_id", "downsample_ratio", "mlp_ratio"}
    derived = {"model_type", "architectures", "projector_type", "projector_depth", "image_tokens",
               "language_model", "vision_tower", "projector"}
    try:
        cfg = VLConfig(lm.config, vision.config, **{k: d[k] for k in known if k in d},
                       extra={k: v for k, v in d.items() if k not in known | derived})
    except (TypeError, KeyError) as e:
        raise ValueError(f"{ckpt / 'config.json'}: {e}") from e
    projector = {f"projector.{k}": v for k, v in read_tensors(ckpt / d.get("projector", PROJECTOR_DIR)).items()}
    state = {**lm.state_dict(), **{f"vision.{k}": v for k, v in vision.state_dict().items()}, **projector}
    with torch.device("meta"):
        model = VLModel(cfg)
    check_state_dict(model, state, ckpt)  # the parts checked themselves: this finds the projector's faults
    model.load_state_dict(state, assign=True)
    model.rotary = lm.rotary
    if dtype is not None:
        model.to(dtype)
    return model.to(device).eval()

