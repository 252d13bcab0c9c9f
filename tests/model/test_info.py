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


def test_plan_671b_on_2048_ranks(capsys):
    from nanoseek.model.plan import bubble_fraction, plan_layout

    layout = plan_layout(preset("671B"), 16, 64, 2, "dualpipev", 4096, 1, 15360 * 4096)
    assert layout["world"] == 2048 and layout["microbatches"] == 120 and len(layout["ranks"]) == 16
    # every layer on exactly one rank; 1/ep of the routed experts per rank: the ranks' parameters add up to the model
    info = model_info(preset("671B"))
    total = sum(r["params"] for r in layout["ranks"])
    expert = info["total_params"] + info["mtp_params"] - total  # what the 63 other ep ranks hold
    assert 0 < expert / 63 < total
    assert bubble_fraction("1f1b", 16, 120) == 15 / 135
    dualpipev, zbv, one_f_one_b = (bubble_fraction(s, 16, 120) for s in ("dualpipev", "zbv", "1f1b"))
    assert zbv < dualpipev < one_f_one_b
    assert main(["model-info", "--preset", "671B", "--plan", "pp=16,ep=64,dp=2"]) == 0
    out = capsys.readouterr().out
    assert "2048 ranks" in out and "bubble 4.0%" in out
    try:
        main(["model-info", "--preset", "671B", "--plan", "pp=16,ep=65"])
    except SystemExit as e:
        assert "ep=65" in str(e)
    else:
        raise AssertionError("a bad --plan must exit with a message")
