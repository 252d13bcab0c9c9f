"""DSA training, V3.2's two steps on the debug recipe: the dense warm-up moves the indexers only and their KL to
the main attention falls; then sparse training (top-k attention, the indexers on their selected keys) lowers the
language-model loss, with both phases and the KL in metrics.jsonl."""

import dataclasses

import pytest
import torch

import nanoseek
from nanoseek.config import load_recipe
from nanoseek.train.metrics import read_metrics
from nanoseek.train.parallelize import init_parallel
from nanoseek.train.pretrain import PretrainConfig, Trainer, pretrain


def dsa_recipe(data_root, *sets: str) -> dict:
    return load_recipe("debug", [f"data.root={data_root}", "pretrain.plots=false", "model.attention=dsa",
                                 "pretrain.val_every=0", "pretrain.save_every=0", *sets])


def test_warmup_trains_only_the_indexers_and_their_kl_falls(data_root, tmp_path):
    recipe = dsa_recipe(data_root, "pretrain.dsa_warmup_steps=15", "pretrain.max_steps=15")
    cfg = PretrainConfig(**recipe["pretrain"])
    trainer = Trainer(recipe, cfg, tmp_path, init_parallel(None, device="cpu"), progress=False)
    trainer.model.init_weights(std=0.1)  # peaked attention: a target far from the untrained indexers' uniform one
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    records = [trainer.train_step() for _ in range(15)]
    assert {r["dsa_phase"] for r in records} == {"warmup"}
    kl = [r["indexer_kl"] for r in records]
    assert sum(kl[-3:]) < 0.7 * sum(kl[:3])
    after = trainer.model.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all(".attn.indexer." in k for k in moved)  # balancing biases and weights untouched
    assert any(k.startswith("mtp.") for k in moved)  # the MTP block's indexer learns too
    assert all(b.attn.sparse is False for b in trainer.model.blocks)  # dense attention while warming up


def test_sparse_phase_after_the_warmup(data_root, tmp_path):
    recipe = dsa_recipe(data_root, "pretrain.dsa_warmup_steps=4", "pretrain.max_steps=20")
    pretrain(recipe, tmp_path, progress=False)
    records = read_metrics(tmp_path / "metrics.jsonl")
    train = [r for r in records if "loss" in r]
    assert [r["dsa_phase"] for r in train] == ["warmup"] * 4 + ["sparse"] * 16
    assert all(r["indexer_kl"] >= 0 and r["loss"] == r["loss"] for r in train)
    sparse = [r["loss"] for r in train[4:]]
    assert sum(sparse[-3:]) / 3 < sum(sparse[:3]) / 3 - 0.3
    # the warm-up leaves the language model alone: its loss stays where initialisation put it
    assert abs(train[3]["loss"] - train[0]["loss"]) < 0.05
    val = [r for r in records if "val_loss" in r]
    assert val and val[-1]["val_indexer_kl"] >= 0
    model = nanoseek.load(tmp_path)
    assert model.config.attention == "dsa" and model.config.index_topk == 16  # the debug preset's indexer
    assert model.config.index_topk < recipe["pretrain"]["seq_len"]  # sparse: the selection drops keys


def test_dsa_settings_errors_name_the_field(data_root, tmp_path):
    recipe = load_recipe("debug", [f"data.root={data_root}", "pretrain.dsa_warmup_steps=3"])  # MLA model
    with pytest.raises(ValueError, match="dsa_warmup_steps=3"):
        pretrain(recipe, tmp_path, progress=False)
    with pytest.raises(ValueError, match="dsa_warmup_steps=-1"):
        dataclasses.replace(PretrainConfig(), dsa_warmup_steps=-1).validate()
