"""Built-in image tasks (deterministic, train and eval disjoint by scene, answers computed from the scene) and
image curation (rejects, exact and perceptual-hash + colour dedup, decontamination, the manifest's accounting)."""

import io
import json

import numpy as np
import pytest
from PIL import Image, ImageDraw

from nanoseek.data.curate.images import (
    ImageCurateConfig,
    colour_distance,
    colour_layout,
    curate_images,
    open_image,
    perceptual_hash,
)
from nanoseek.data.synth.images import COLOURS, SCENES, _draw_shape, make_image_problems, write_image_set
from nanoseek.data.synth.tasks import split_of


@pytest.mark.parametrize("scene", list(SCENES))
def test_deterministic_and_disjoint(scene):
    a, b = make_image_problems(scene, 6, 3), make_image_problems(scene, 6, 3)
    assert [(p.question, p.answer) for p in a] == [(p.question, p.answer) for p in b]
    assert all(np.array_equal(np.asarray(p.image), np.asarray(q.image)) for p, q in zip(a, b, strict=True))
    train = make_image_problems(scene, 30, 0, "train")
    held = make_image_problems(scene, 10, 0, "eval")
    assert {p.key for p in train}.isdisjoint({p.key for p in held})
    assert all(split_of(p.key) == "eval" for p in held)
    assert all(p.image.size == (64, 64) for p in train)


def test_answers_come_from_the_scene():
    for p in make_image_problems("ocr", 10, 1):
        assert p.key == f"ocr {p.answer}" and len(p.answer) == 4
    for p in make_image_problems("chart", 20, 1):
        values = [int(v) for v in p.key.split()[1:]]
        if p.task in ("chart_largest", "chart_highest"):
            assert "ABCD".index(p.answer) == values.index(max(values))
        else:
            assert int(p.answer) == values["ABCD".index(p.question.rstrip("?")[-1])]
    for p in make_image_problems("shapes", 30, 1):
        if p.task == "shapes_count":
            assert int(p.answer) == len(p.key.split()[1:]) // 4


def test_curation_dedups_and_rejects(tmp_path):
    jsonl = write_image_set(tmp_path / "set", {"ocr": 6, "shapes": 4}, 0)
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    img = Image.open(tmp_path / "set" / records[0]["image"])
    img.save(tmp_path / "set" / "copy.png")  # exact pixels
    img.resize((80, 80)).resize((64, 64)).save(tmp_path / "set" / "near.png")  # resampled: a near duplicate
    (tmp_path / "set" / "text.png").write_text("not an image")
    png = (tmp_path / "set" / records[1]["image"]).read_bytes()
    (tmp_path / "set" / "cut.png").write_bytes(png[: len(png) // 2])
    extra = [{"image": "copy.png", "text": "a"}, {"image": "near.png", "text": "b"},
             {"image": "text.png", "text": "c"}, {"image": "cut.png", "text": "d"}, {"image": "gone.png", "text": "e"},
             {"image": "copy.png"}, ["not", "an", "object"]]  # 5 of these 7 are rejected
    jsonl.write_text(jsonl.read_text() + "".join(json.dumps(r) + "\n" for r in extra))
    eval_image = tmp_path / "eval.png"
    Image.open(tmp_path / "set" / records[2]["image"]).save(eval_image)
    m = curate_images([jsonl], tmp_path / "out", [eval_image])
    t = m["totals"]
    assert t["records"] == 17 and t["records"] == t["kept"] + t["removed"] + t["rejected"]
    assert t["rejected"] == 5
    reasons = " ".join(m["rejects"]["reasons"])
    assert "not an image" in reasons and "truncated" in reasons and "no such image" in reasons
    assert m["stages"]["exact_dedup"]["removed"] >= 1 and m["stages"]["near_dedup"]["removed"] >= 1
    assert m["stages"]["decontamination"]["removed"] >= 1
    kept = [json.loads(line)["image"] for line in (tmp_path / "out" / "records.jsonl").read_text().splitlines()]
    assert all(not k.endswith(("copy.png", "near.png")) for k in kept)
    assert "kept + removed + rejected" in (tmp_path / "out" / "data_card.md").read_text()


def test_perceptual_hash_and_limits(tmp_path):
    a, b = make_image_problems("chart", 2, 5)
    ha, hb = perceptual_hash(a.image), perceptual_hash(b.image)
    assert bin(ha ^ perceptual_hash(a.image.resize((128, 128)))).count("1") <= 2  # rescaled: the same image
    assert bin(ha ^ hb).count("1") > 4  # another chart
    big = tmp_path / "big.png"
    Image.new("RGB", (300, 300)).save(big)
    with pytest.raises(ValueError, match="more than"):
        open_image(big, max_pixels=10_000)
    Image.new("RGB", (8, 8)).save(tmp_path / "x.tiff")
    with pytest.raises(ValueError, match="unsupported image format TIFF"):
        open_image(tmp_path / "x.tiff")
    with pytest.raises(ValueError, match="max_distance"):
        ImageCurateConfig(max_distance=9).validate()
    with pytest.raises(ValueError, match="max_colour_distance"):
        ImageCurateConfig(max_colour_distance=-1).validate()


def _curate(tmp_path, train: dict[str, Image.Image], held: dict[str, Image.Image] = ()) -> tuple[dict, list[str]]:
    """Curate PNGs `train` (name -> image, in order) against eval PNGs `held`: the manifest and the kept names."""
    for name, im in {**train, **dict(held)}.items():
        im.save(tmp_path / f"{name}.png")
    jsonl = tmp_path / "records.jsonl"
    jsonl.write_text("".join(json.dumps({"image": f"{n}.png", "text": n}) + "\n" for n in train))
    m = curate_images([jsonl], tmp_path / "out", [tmp_path / f"{n}.png" for n in dict(held)])
    kept = [json.loads(line)["text"] for line in (tmp_path / "out" / "records.jsonl").read_text().splitlines()]
    return m, kept


def _shapes(colours: list[str]) -> Image.Image:
    im = Image.new("RGB", (64, 64), (240, 240, 240))
    d = ImageDraw.Draw(im)
    for (cx, cy, kind), colour in zip([(16, 16, "circle"), (48, 20, "square"), (30, 48, "triangle")], colours,
                                      strict=True):
        _draw_shape(d, kind, cx, cy, 6, COLOURS[colour])
    return im


def test_colour_only_differences_are_not_duplicates(tmp_path):
    """Issue #18: the grey perceptual hash calls same-place shapes of other colours the same image; the colour
    layout keeps them apart, in near_dedup and in decontamination."""
    a, b, c = _shapes(["red", "green", "blue"]), _shapes(["blue", "green", "red"]), _shapes(["purple", "green",
                                                                                              "blue"])
    max_bits = ImageCurateConfig().max_distance
    for x in (b, c):
        assert bin(perceptual_hash(a) ^ perceptual_hash(x)).count("1") <= max_bits  # grey: "the same"
        assert colour_distance(colour_layout(a), colour_layout(x)) > ImageCurateConfig().max_colour_distance
    m, kept = _curate(tmp_path, {"a": a, "b": b}, {"c": c})
    assert kept == ["a", "b"] and m["totals"]["removed"] == 0
    assert m["config"]["max_colour_distance"] == ImageCurateConfig().max_colour_distance


def test_noised_and_reencoded_copies_are_duplicates(tmp_path):
    """A copy with pixel noise, a JPEG re-encoding of it, and an exact copy are removed (near_dedup, exact_dedup),
    and a noised copy of an eval image is decontaminated."""
    a, other = (p.image for p in make_image_problems("chart", 2, 5))
    shape = _shapes(["red", "green", "blue"])

    def noised(im, seed):
        x = np.asarray(im, np.float32) + np.random.default_rng(seed).normal(0, 4, (64, 64, 3))
        return Image.fromarray(np.clip(x, 0, 255).astype(np.uint8))

    def jpeg(im):
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=85)
        return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")

    train = {"a": a, "a_noised": noised(a, 0), "a_jpeg": jpeg(a), "a_copy": a.copy(), "other": other,
             "shape_jpeg": jpeg(noised(shape, 1))}
    m, kept = _curate(tmp_path, train, {"shape": shape})
    assert kept == ["a", "other"]
    assert {s: v["removed"] for s, v in m["stages"].items()} == {"exact_dedup": 1, "near_dedup": 2,
                                                                 "decontamination": 1}
    reasons = [json.loads(line)["reason"] for line in (tmp_path / "out" / "removed.jsonl").read_text().splitlines()]
    assert any("colours within" in r for r in reasons) and any("same pixels" in r for r in reasons)
