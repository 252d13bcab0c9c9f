"""Recipe faults (issue 13): an unknown table is an error like an unknown field, `--set` parses or fails with one
clear line, an inheritance cycle is named, and a negative count is refused -- in the library and on the command
line, before any work starts."""

import pytest

from nanoseek.cli import main as cli
from nanoseek.config import RECIPE_TABLES, check_tables, from_dict, load_recipe, recipe_names, set_path
from nanoseek.data.builtin import DataConfig
from nanoseek.posttrain.grpo import GRPOConfig
from nanoseek.train.pretrain import PretrainConfig, pretrain


def one_error_line(capsys, command: str) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"nanoseek {command}: error: "), err
    return err


def test_a_typo_in_a_table_name_is_refused(tmp_path, capsys):
    recipe = tmp_path / "typo.toml"
    recipe.write_text('base = "debug"\n[pretrian]\nmax_steps = 3\n')
    with pytest.raises(ValueError, match=r"recipe 'typo': unknown table \[pretrian\]; known tables: .*pretrain"):
        check_tables(load_recipe(recipe))
    assert cli(["pretrain", "--recipe", str(recipe), "--out", str(tmp_path / "run")]) == 2
    assert "unknown table [pretrian]" in one_error_line(capsys, "pretrain")
    assert not (tmp_path / "run").exists()  # refused before anything ran


def test_a_field_outside_any_table_or_a_table_that_is_a_value_is_refused(tmp_path):
    recipe = tmp_path / "flat.toml"
    recipe.write_text("max_steps = 3\n")
    with pytest.raises(ValueError, match="max_steps = 3 is outside any table"):
        check_tables(load_recipe(recipe))
    with pytest.raises(ValueError, match="pretrain = 3 must be a table"):
        check_tables({"name": "x", "pretrain": 3})


def test_a_section_named_on_the_command_line_is_a_known_table():
    recipe = {"name": "mine", "model": {}, "sft_math": {"max_steps": 2}}
    with pytest.raises(ValueError, match=r"unknown table \[sft_math\]"):
        check_tables(recipe)
    check_tables(recipe, extra=("sft_math",))  # nanoseek sft --section sft_math


@pytest.mark.parametrize("name", recipe_names())
def test_every_built_in_recipe_uses_known_tables_only(name):
    recipe = load_recipe(name)
    check_tables(recipe)
    assert set(recipe) - {"name"} <= RECIPE_TABLES


def test_the_pretrain_command_reads_a_run_recipe_data_table():
    """tiny's [data] shapes the built-in corpus (difficulty, mix, task_mix) for `nanoseek run` and `nanoseek
    pretrain` alike: the README's `nanoseek pretrain --recipe tiny` must accept it."""
    data = from_dict(DataConfig, load_recipe("tiny")["data"], "data")
    assert data.mix and data.task_mix and data.difficulty == "1-2"


BAD_OVERRIDES = {
    "=5": "expected KEY=VALUE",
    "pretrain.lr": "expected KEY=VALUE",
    "pretrain..lr=1": "expected KEY=VALUE",
    ".lr=1": "expected KEY=VALUE",
    "pre train.lr=1": "expected KEY=VALUE",
    "pretrain.lr.x=1": "pretrain.lr is a value, not a table",
    "pretrain.lr.x.y=1": "pretrain.lr is a value, not a table",
    "pretrain=5": "pretrain is a table; set one of its fields",
    "eval.tasks=[arith": "not a valid TOML value",
    'pretrain.device="cpu': "not a valid TOML value",
}


@pytest.mark.parametrize("item", sorted(BAD_OVERRIDES))
def test_a_bad_set_fails_with_one_line(item, tmp_path, capsys):
    recipe = load_recipe("debug")
    with pytest.raises(ValueError, match=BAD_OVERRIDES[item]) as err:
        set_path(recipe, item)
    assert "\n" not in str(err.value) and repr(item) in str(err.value)
    assert cli(["pretrain", "--recipe", "debug", "--out", str(tmp_path / "run"), "--set", item]) == 2
    assert BAD_OVERRIDES[item] in one_error_line(capsys, "pretrain")


def test_good_set_values_still_parse():
    recipe = load_recipe("debug", ["pretrain.lr=1e-3", "data.root=/tmp/some dir", 'eval.tasks=["arithmetic"]',
                                   "data.curate.quality.min_words=20", "pretrain.fp8=", "pretrain.compile=true"])
    assert recipe["pretrain"]["lr"] == 1e-3 and recipe["data"]["root"] == "/tmp/some dir"
    assert recipe["eval"]["tasks"] == ["arithmetic"] and recipe["data"]["curate"] == {"quality": {"min_words": 20}}
    assert recipe["pretrain"]["fp8"] == "" and recipe["pretrain"]["compile"] is True
    settings = {}
    set_path(settings, "workers=2")  # curation's --set takes top-level keys
    assert settings == {"workers": 2}


def test_an_inheritance_cycle_is_named(tmp_path, capsys):
    (tmp_path / "self.toml").write_text(f'base = "{tmp_path / "self.toml"}"\n[pretrain]\nmax_steps = 3\n')
    with pytest.raises(ValueError, match="recipe inheritance cycle: .*self.toml -> .*self.toml"):
        load_recipe(tmp_path / "self.toml")
    (tmp_path / "a.toml").write_text(f'base = "{tmp_path / "b.toml"}"\n')
    (tmp_path / "b.toml").write_text(f'base = "{tmp_path / "a.toml"}"\n')
    with pytest.raises(ValueError, match="cycle: .*a.toml -> .*b.toml -> .*a.toml"):
        load_recipe(tmp_path / "a.toml")
    assert cli(["pretrain", "--recipe", str(tmp_path / "a.toml"), "--out", str(tmp_path / "run")]) == 2
    assert "inheritance cycle" in one_error_line(capsys, "pretrain")


def test_a_base_that_is_not_a_name_is_refused(tmp_path):
    (tmp_path / "r.toml").write_text("base = 3\n")
    with pytest.raises(ValueError, match="base=3 must name a recipe"):
        load_recipe(tmp_path / "r.toml")


@pytest.mark.parametrize("cls,table,field", [(PretrainConfig, "pretrain", "save_every"),
                                             (PretrainConfig, "pretrain", "max_steps"),
                                             (PretrainConfig, "pretrain", "warmup_steps"),
                                             (GRPOConfig, "grpo", "max_steps"),
                                             (GRPOConfig, "grpo", "num_generations")])
def test_a_negative_count_in_a_table_is_refused(cls, table, field):
    with pytest.raises(ValueError, match=f"{table}.{field}: expected a count >= 0, got -1"):
        from_dict(cls, {field: -1}, table)
    from_dict(cls, {field: 0}, table)  # zero is a count (0 = "off" for save_every and friends)


@pytest.mark.parametrize("args", [["--save-every", "-1"], ["--max-steps", "-5"],
                                  ["--set", "pretrain.val_every=-2"]])
def test_a_negative_count_on_the_command_line_is_one_line(args, tmp_path, capsys):
    assert cli(["pretrain", "--recipe", "debug", "--out", str(tmp_path / "run"), *args]) == 2
    assert "expected a count >= 0" in one_error_line(capsys, "pretrain")
    with pytest.raises(ValueError, match="pretrain.save_every: expected a count >= 0"):
        pretrain(load_recipe("debug"), tmp_path / "api", save_every=-1)
    assert not (tmp_path / "run").exists() and not (tmp_path / "api").exists()
