"""The DeepSeek-V3 model: config, MLA, DeepSeekMoE, MTP, and the HF-compatible checkpoint format."""

from nanoseek.model.config import PRESETS, ModelConfig, preset
from nanoseek.model.hf import load, save_pretrained
from nanoseek.model.mla import LatentCache
from nanoseek.model.transformer import ModelOutput, Transformer

__all__ = ["PRESETS", "LatentCache", "ModelConfig", "ModelOutput", "Transformer", "load", "preset", "save_pretrained"]
