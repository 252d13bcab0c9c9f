"""VL stages on the post-training loop: a VL checkpoint assembled from a text one (tokenizer and embedding grow by
`<image>`), projector alignment that moves the projector only, joint training that learns, and the held-out image
evaluation on its output."""

import json

import pytest
import torch

import nanoseek
from nanoseek.data.synth.images import write_image_set
from nanoseek.data.tokenizer import Tokenizer
from nanoseek.eval.vl import evaluate_images
from nanoseek.model.vl import VLModel
from nanoseek.posttrain.vl import build_vl, vl_grpo, vl_train


@pytest.mark.slow  # ~25 s on a shared 2-core CPU
def test_build_align_train_evaluate(policy_dir, tmp_path):
    text = nanoseek.load(policy_dir)
    vl_dir = build_vl(policy_dir, tmp_path / "vl", "vl-debug")
    tok = Tokenizer.load(vl_dir)
    vl = nanoseek.load(vl_dir)
    assert isinstance(vl, VLModel) and tok.image_id == Tokenizer.load(policy_dir).vocab_size
    assert vl.config.vocab_size == text.config.vocab_size + 1
    assert torch.equal(vl.embed.weight[:-1], text.embed.weight)  # the text model's weights, kept
    ids = torch.tensor([Tokenizer.load(policy_dir).encode("3 + 4 =")])
    with torch.no_grad():
        assert torch.allclose(vl(ids)[..., :-1], text(ids), atol=1e-6)

    data = write_image_set(tmp_path / "images", {"shapes": 12, "ocr": 4}, 0)
    recipe = {"vl_align": {"train": ["projector"], "max_steps": 4, "batch_size": 4, "lr": 1e-2, "val_fraction": 0.0,
                           "threads": 1},
              "vl_sft": {"train": ["projector", "vision", "language"], "max_steps": 30, "batch_size": 16,
                         "lr": 3e-3, "warmup_steps": 0, "val_fraction": 0.0, "threads": 1}}
    aligned = vl_train(recipe, tmp_path / "align", vl_dir, [data], "vl_align", progress=False)
    after = nanoseek.load(aligned)
    assert isinstance(after, VLModel) and (aligned / "tokenizer.json").exists()
    for name, t in vl.state_dict().items():
        same = torch.equal(t, after.state_dict()[name])
        assert same != name.startswith("projector."), name  # the projector moved, nothing else did

    trained = vl_train(recipe, tmp_path / "sft", aligned, [data], "vl_sft", progress=False)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    assert losses[-1] < 0.5 * losses[0]  # 16 conversations, 30 steps: memorised

    recipe["vl_grpo"] = {"tasks": ["shapes_count", "ocr"], "prompts_per_step": 3, "num_generations": 4,
                         "max_new_tokens": 4, "max_steps": 3, "lr": 1e-3, "threads": 1}
    before = nanoseek.load(trained)
    rl = vl_grpo(recipe, tmp_path / "grpo", trained, [data], progress=False)
    steps = [json.loads(line) for line in (tmp_path / "grpo" / "metrics.jsonl").read_text().splitlines()
             if '"reward"' in line]
    assert len(steps) == 3 and all(0 <= s["reward"] <= 1 for s in steps)
    moved = [k for k, t in nanoseek.load(rl).state_dict().items() if not torch.equal(t, before.state_dict()[k])]
    if any(s["no_signal"] == 0 for s in steps):  # a step with signal moves the tower or projector, nothing else
        assert moved and all(k.startswith(("vision.", "projector.")) for k in moved)
    else:
        assert moved == []

    records = [json.loads(line) for line in data.read_text().splitlines()][:6]
    result = evaluate_images(nanoseek.load(trained), tok, records, root=data.parent)
    assert sum(t["n"] for t in result["tasks"].values()) == 6
    for t in result["tasks"].values():
        assert 0 <= t["ci95"][0] <= t["accuracy"] <= t["ci95"][1] <= 1


def test_text_replay_and_bad_records(policy_dir, tmp_path):
    """Text conversations (no image) train beside image ones in one packed batch; a text record with a
    placeholder, or an image record with two, is skipped and counted."""
    from nanoseek.posttrain.vl import load_vl_examples, vl_loss

    vl_dir = build_vl(policy_dir, tmp_path / "vl", "vl-debug")
    model, tok = nanoseek.load(vl_dir), Tokenizer.load(vl_dir)
    data = write_image_set(tmp_path / "images", {"shapes": 2}, 0)
    turn = [{"role": "user", "content": "what is 2 + 2?"}, {"role": "assistant", "content": "4"}]
    bad_text = [{"role": "user", "content": "<image> hi"}, {"role": "assistant", "content": "hello"}]
    records = [json.loads(line) for line in data.read_text().splitlines()]
    two = {**records[0], "messages": [{"role": "user", "content": "<image><image>"}, turn[1]]}
    extra = [{"messages": turn}, {"messages": bad_text}, two, {"image": records[1]["image"], "text": "a caption"}]
    data.write_text(data.read_text() + "".join(json.dumps(r) + "\n" for r in extra))
    n = model.vl_config.image_tokens
    examples, skipped = load_vl_examples([data], tok, n, 512)
    assert skipped == {"invalid": 2, "too_long": 0}
    assert [e.image is None for e in examples] == [False, False, True, False]
    assert all(e.ids.count(tok.image_id) == (0 if e.image is None else n) for e in examples)
    loss, count = vl_loss(model, examples, 200, tok.pad_id, torch.device("cpu"))
    assert torch.isfinite(loss) and count > 0
    text_only, _ = vl_loss(model, [examples[2]], 200, tok.pad_id, torch.device("cpu"))
    assert torch.isfinite(text_only)
