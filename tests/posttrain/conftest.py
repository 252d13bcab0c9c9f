"""A small policy checkpoint (debug-preset model + a BPE tokenizer trained in-process) for stage tests."""

import pytest
import torch

from nanoseek.data.synth import make_problems
from nanoseek.data.tokenizer import train_tokenizer
from nanoseek.model import Transformer, preset


@pytest.fixture(scope="session")
def policy_dir(tmp_path_factory):
    """A checkpoint directory as a stage leaves it: config.json, model.safetensors and the tokenizer files."""
    problems = make_problems("arithmetic", 200, difficulty=[1, 2]) + make_problems("logic", 50)
    texts = [p.question + "\n" + p.reasoning() for p in problems] + ["Hello there, how are you today?"] * 5
    path = tmp_path_factory.mktemp("policy")
    tok = train_tokenizer(texts, 400, path)
    torch.manual_seed(0)
    model = Transformer(preset("debug", vocab_size=tok.vocab_size))
    model.save_pretrained(path)
    return path
