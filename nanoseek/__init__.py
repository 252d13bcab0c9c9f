"""nanoseek: the complete DeepSeek training recipe as real, readable Python."""

__version__ = "0.1.0"


def load(path, dtype=None, device="cpu"):
    """Load a model from a nanoseek checkpoint, a run directory (its latest checkpoint), an HF DeepseekV3 dir or a
    VL checkpoint directory (a `nanoseek.model.vl.VLModel`)."""
    from nanoseek.model.hf import load as _load

    return _load(path, dtype=dtype, device=device)
