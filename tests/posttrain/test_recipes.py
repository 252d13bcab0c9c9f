"""The post-training recipes parse into their stages' configurations (a typo in a field name is an error)."""

import pytest

from nanoseek.config import from_dict, load_recipe
from nanoseek.posttrain.distill import DistillConfig
from nanoseek.posttrain.dpo import DPOConfig
from nanoseek.posttrain.grpo import GRPOConfig
from nanoseek.posttrain.rejection import RejectionConfig
from nanoseek.posttrain.sft import SFTConfig

STAGES = {
    "r1-zero": {"grpo": GRPOConfig},
    "r1": {"sft_cold": SFTConfig, "grpo_reasoning": GRPOConfig, "rejection": RejectionConfig, "sft": SFTConfig,
           "grpo_final": GRPOConfig},
    "distill": {"distill": DistillConfig, "distill_sft": SFTConfig},
    "dpo": {"dpo": DPOConfig},
}


@pytest.mark.parametrize("name", sorted(STAGES))
def test_recipe_tables_build_their_configs(name):
    recipe = load_recipe(name)
    for section, cls in STAGES[name].items():
        cfg = from_dict(cls, recipe[section], section)
        if hasattr(cfg, "validate"):
            cfg.validate()
    assert "model" in recipe and "data" in recipe  # inherited from the base recipe


def test_unknown_field_is_named():
    with pytest.raises(ValueError, match="learning_rate"):
        from_dict(GRPOConfig, {"learning_rate": 1e-5}, "grpo")
    with pytest.raises(ValueError, match="loss_type"):
        from_dict(GRPOConfig, {"loss_type": "ppo"}, "grpo").validate()


def test_child_recipe_replaces_whole_tables():
    """A child's table replaces its parent's whole (its `tasks = {...}` too: merging them would train on tasks the
    child never named); the tables it does not write are inherited."""
    from nanoseek.config import merge

    parent = {"grpo": {"tasks": {"arithmetic": 1.0, "logic": 1.0}, "lr": 1e-4}, "model": {"preset": "tiny"}}
    child = {"grpo": {"tasks": {"countdown": 1.0}}}
    merged = merge(parent, child)
    assert merged["grpo"] == {"tasks": {"countdown": 1.0}}
    assert merged["model"] == {"preset": "tiny"}
