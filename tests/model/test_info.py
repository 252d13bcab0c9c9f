from nanoseek.cli import main
from nanoseek.model.config import preset
from nanoseek.model.info import model_info


def test_671b_sizes_match_the_paper():
    info = model_info(preset("671B"))
    assert 670e9 < info["total_params"] < 672e9  # "671B total parameters"
    assert 36e9 < info["active_params"] < 38e9  # "37B activated for each token"
    assert info["kv_elems_per_token_layer_mla"] == 576 and info["kv_elems_per_token_layer_naive"] == 40960


def test_presets_sizes():
    assert model_info(preset("debug"))["total_params"] < 1e6
    assert 10e6 <= model_info(preset("tiny"))["total_params"] <= 20e6


def test_model_info_cli(capsys):
    assert main(["model-info", "--preset", "671B"]) == 0
    out = capsys.readouterr().out
    assert "671.03B" in out and "MLA 576" in out
