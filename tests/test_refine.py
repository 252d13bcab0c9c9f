"""The refinement loop end to end on the debug chat model (#16): serve -> chat requests with the official
`openai` client -> ratings over HTTP -> `nanoseek refine` (export, curation, DPO, evaluation before and after)
-> the preferred answers' log-probability margin rises on held-out feedback prompts -> the server reloads the
new checkpoint and serves it."""

import json

import httpx
import pytest
import torch

from nanoseek.infer.engine import load_engine
from nanoseek.infer.serve.app import Access, Limits, create_app
from nanoseek.infer.serve.feedback import FeedbackStore
from nanoseek.model.hf import load, resolve_checkpoint
from nanoseek.refine import heldout
from tests.infer.conftest import chat_dir, chat_model, one_thread, tokenizer  # noqa: F401 - shared fixtures
from tests.infer.test_serve import LiveServer

openai = pytest.importorskip("openai")

KEY = "sk-refine"
NAMES = ["ada", "bob", "cy", "dee", "eve", "fay", "gus", "hal", "ivy", "jo", "kit", "lou", "max", "ned", "oz",
         "pam", "quin", "rex", "sue", "tom", "uma", "vic", "wes", "xia"]


def cli(argv: list[str]) -> int:
    from nanoseek.cli import main

    return main(argv)


def test_the_loop_from_served_answers_to_a_reloaded_better_checkpoint(chat_dir, tmp_path):
    db = tmp_path / "feedback.sqlite"
    app = create_app(load_engine(chat_dir, max_batch=4), "loop", Limits(max_tokens_cap=60), FeedbackStore(db),
                     Access(KEY), "flag", loader=lambda path: load_engine(path or chat_dir, max_batch=4))
    with LiveServer(app) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
        rate = lambda cid, rating: httpx.post(server.url + "/v1/feedback", timeout=30,  # noqa: E731
                                              headers={"authorization": f"Bearer {KEY}"},
                                              json={"completion_id": cid, "rating": rating}).json()
        pairs = 0
        for i, name in enumerate(NAMES):
            messages = [{"role": "user", "content": f"hi {name}"}]
            good = client.chat.completions.create(model="loop", messages=messages, temperature=0, max_tokens=40)
            bad = client.chat.completions.create(model="loop", messages=messages, temperature=2.0, max_tokens=40,
                                                 seed=i)
            if bad.choices[0].message.content == good.choices[0].message.content:
                continue
            assert rate(good.id, 1)["verified"] and rate(bad.id, -1)["verified"]
            pairs += 1
        assert pairs >= 15
        assert sum(heldout([{"role": "user", "content": f"hi {n}"}], 0.25, 0) for n in NAMES) >= 3

        out = tmp_path / "refine"
        task = tmp_path / "greetings.jsonl"  # the debug model's 256-token context cannot hold a built-in prompt
        task.write_text("".join(json.dumps({"question": q, "answer": "#### hello there"}) + "\n"
                                for q in ("hi", "hello", "hey there", "good morning")))
        argv = ["refine", "--model", str(chat_dir), "--feedback", str(db), "--out", str(out), "--no-progress",
                "--set", "refine.heldout_fraction=0.25", "--set", f"refine.eval_tasks=[\"gsm8k:{task}\"]",
                "--set", "refine.eval_template=chat", "--set", "refine.eval_n=8", "--set", "refine.eval_k=1", "--set", "refine.max_tokens=128",
                "--set", "dpo.lr=1e-3", "--set", "dpo.epochs=4", "--set", "dpo.threads=1",
                "--reload", server.url, "--api-key", KEY]
        assert cli(argv) == 0
        report = json.loads((out / "refine.json").read_text())
        assert report["export"]["preference"] == pairs and report["curation"]["kept"] >= pairs
        assert report["data"]["pairs_heldout"] >= 3 and report["data"]["pairs_train"] >= 10
        before, after = report["before"]["feedback_heldout"], report["after"]["feedback_heldout"]
        # every held-out pair is scored or counted as skipped (a sampled reply may spell a control token)
        assert before["pairs"] == after["pairs"] >= 3
        assert before["pairs"] + sum(before["skipped"].values()) == report["data"]["pairs_heldout"]
        assert after["margin"] > before["margin"] + 1.0  # held-out prompts: never trained on
        assert after["accuracy"] >= before["accuracy"]
        assert len(report["after"]["tasks"]) == 1
        assert (out / "refine.md").exists() and (out / "curated" / "data_card.md").exists()

        # the server now serves the refined checkpoint, and the feedback store carried on
        served = server.server.config.app.state.server.backend.model
        refined = load(resolve_checkpoint(report["checkpoint"]))
        for (name, p), q in zip(served.state_dict().items(), refined.state_dict().values(), strict=True):
            assert torch.equal(p.cpu(), q), name
        reply = client.chat.completions.create(model="loop", messages=[{"role": "user", "content": "hi"}],
                                               temperature=0, max_tokens=40)
        assert reply.choices[0].finish_reason in ("stop", "length")
        assert rate(reply.id, 1)["verified"]
