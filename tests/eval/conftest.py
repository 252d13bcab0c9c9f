"""A small checkpoint for evaluation tests: a debug-preset model (random weights) and a BPE tokenizer trained
in-process, saved the way training stages leave a checkpoint (config.json, model.safetensors, tokenizer files)."""

import pytest
import torch

from nanoseek.data.synth import make_problems
from nanoseek.data.tokenizer import train_tokenizer
from nanoseek.model import Transformer, preset


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    problems = make_problems("arithmetic", 200, difficulty=[1, 2]) + make_problems("multihop", 50)
    texts = [p.question + "\n" + p.reasoning() for p in problems] + ["Question: A. B. C. D. Answer:"] * 5
    path = tmp_path_factory.mktemp("ckpt")
    tok = train_tokenizer(texts, 400, path)
    torch.manual_seed(0)
    Transformer(preset("debug", vocab_size=tok.vocab_size)).save_pretrained(path)
    return path
