"""The server's guard rails (#16): the API key, JSON-only writes from the server's own origin, bounded and
verified feedback, moderation (the endpoint with the official client, flag and block), and reloading a new
checkpoint while requests run."""

import json
import sqlite3

import httpx
import pytest
import torch

from nanoseek.infer.engine import load_engine
from nanoseek.infer.moderation import Moderator, heldout_scores
from nanoseek.infer.serve.app import REFUSAL, Access, Limits, create_app
from nanoseek.infer.serve.feedback import FeedbackStore, export
from nanoseek.infer.serve.protocol import FEEDBACK_MAX_CHARS
from nanoseek.model import Transformer, preset
from tests.infer.test_serve import LiveServer

openai = pytest.importorskip("openai")

KEY = "sk-test-key"
HI = [{"role": "user", "content": "hi"}]
TOXIC = "You are a worthless idiot, shut up and go kill yourself."


def serve(chat_dir, tmp_path, moderation="flag", key=KEY, origins=()):
    db = tmp_path / f"feedback-{moderation}.sqlite"
    app = create_app(load_engine(chat_dir, max_batch=4), "chat-test", Limits(max_tokens_cap=80), FeedbackStore(db),
                     Access(key, origins), moderation,
                     loader=lambda path: load_engine(path or chat_dir, max_batch=4))
    server = LiveServer(app)
    server.db = db
    return server


def rows(db, kind):
    with sqlite3.connect(db) as c:
        return [json.loads(m) for (m,) in c.execute("SELECT meta FROM feedback WHERE kind = ?", (kind,))]


def test_the_api_key_guards_v1_and_admin_routes(chat_dir, tmp_path):
    with serve(chat_dir, tmp_path) as s:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as e:
            client.chat.completions.create(model="m", messages=HI, max_tokens=5)
        assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
        assert httpx.post(s.url + "/v1/chat/completions", json={"messages": HI}).status_code == 401  # no key
        assert httpx.get(s.url + "/v1/models").status_code == 401
        assert httpx.get(s.url + "/health").status_code == 200 and httpx.get(s.url + "/").status_code == 200
        client = openai.OpenAI(base_url=s.url + "/v1", api_key=KEY, max_retries=0)
        reply = client.chat.completions.create(model="m", messages=HI, temperature=0, max_tokens=60)
        assert reply.choices[0].message.content == "hello there"


def test_writes_take_only_json_from_the_servers_own_origin(chat_dir, tmp_path):
    with serve(chat_dir, tmp_path, key=None, origins=("http://localhost:3000",)) as s:
        body = json.dumps({"completion_id": "x", "rating": 1})
        # a cross-site form or text/plain POST needs no CORS preflight: it must not write a rating
        for kind in ("text/plain", "application/x-www-form-urlencoded", None):
            headers = {"content-type": kind} if kind else {}
            r = httpx.post(s.url + "/v1/feedback", content=body, headers=headers)
            assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type"
        json_headers = {"content-type": "application/json"}
        r = httpx.post(s.url + "/v1/feedback", content=body, headers={**json_headers, "origin": "https://evil.example"})
        assert r.status_code == 403 and r.json()["error"]["code"] == "origin_not_allowed"
        for origin in (s.url, "http://localhost:3000"):  # the page's own origin, and one the server allows
            r = httpx.post(s.url + "/v1/chat/completions", headers={**json_headers, "origin": origin},
                           json={"messages": HI, "max_tokens": 5})
            assert r.status_code == 200
        assert httpx.post(s.url + "/admin/reload", json={}).status_code == 403  # no key: no admin routes
        # a browser on an allowed origin gets CORS answers (its preflight, then the POST); others get none
        preflight = httpx.options(s.url + "/v1/chat/completions", headers={
            "origin": "http://localhost:3000", "access-control-request-method": "POST",
            "access-control-request-headers": "content-type"})
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == "http://localhost:3000"
        refused = httpx.options(s.url + "/v1/chat/completions", headers={
            "origin": "https://evil.example", "access-control-request-method": "POST"})
        assert "access-control-allow-origin" not in refused.headers


def test_feedback_is_bounded_and_unverified_ratings_stay_out_of_the_export(chat_dir, tmp_path):
    with serve(chat_dir, tmp_path, key=None) as s:
        big = {"rating": 1, "messages": HI, "response": "x" * (FEEDBACK_MAX_CHARS + 1)}
        r = httpx.post(s.url + "/v1/feedback", json=big)
        assert r.status_code == 400 and r.json()["error"]["param"] == "response"
        turns = [{"role": "user", "content": "y" * 20_000}] * 2
        r = httpx.post(s.url + "/v1/feedback", json={"rating": 1, "messages": turns, "response": "ok"})
        assert r.status_code == 400 and "characters" in r.json()["error"]["message"]
        r = httpx.post(s.url + "/v1/feedback", json={"rating": 1, "messages": HI, "response": "x" * 2_000_000})
        assert r.status_code == 413
        # a forged "liked" answer is stored as unverified; a rating of a real answer is verified
        forged = httpx.post(s.url + "/v1/feedback", json={"rating": 1, "messages": HI, "response": "buy crypto"})
        assert forged.status_code == 200 and forged.json()["verified"] is False
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0)
        reply = client.chat.completions.create(model="m", messages=HI, temperature=0, max_tokens=60)
        real = httpx.post(s.url + "/v1/feedback", json={"rating": 1, "completion_id": reply.id})
        assert real.json()["verified"] is True
    counts = export(s.db, tmp_path / "out")
    assert counts["sft"] == 1 and counts["unverified_skipped"] == 1
    assert "buy crypto" not in (tmp_path / "out" / "sft.jsonl").read_text()
    assert export(s.db, tmp_path / "all", include_unverified=True)["sft"] == 2


def test_the_moderation_classifier_on_the_shipped_held_out_set():
    scores = heldout_scores()
    assert scores["n"] == 60 and scores["precision"] >= 0.9 and scores["recall"] >= 0.85
    result = Moderator()("mail me at jane.doe@example.com")
    assert result["categories"]["pii"] and not result["flagged"]  # PII is reported, not flagged as toxic


def test_moderations_endpoint_with_the_official_client(chat_dir, tmp_path):
    with serve(chat_dir, tmp_path) as s:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key=KEY, max_retries=0)
        out = client.moderations.create(input=[TOXIC, "How do I sort a list in Python?"])
        assert [r.flagged for r in out.results] == [True, False]
        assert out.results[0].categories.self_harm and out.results[0].category_scores.self_harm == 1.0
        assert 0 <= out.results[1].category_scores.hate <= 1
        single = client.moderations.create(input=TOXIC)
        assert len(single.results) == 1 and single.results[0].flagged


def test_flag_serves_and_records_block_refuses(chat_dir, tmp_path, monkeypatch):
    with serve(chat_dir, tmp_path, moderation="flag") as s:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key=KEY, max_retries=0)
        reply = client.chat.completions.create(model="m", messages=[{"role": "user", "content": TOXIC}],
                                               max_tokens=5)
        assert reply.choices[0].finish_reason != "content_filter"
        assert [r["stage"] for r in rows(s.db, "moderation")] == ["prompt"]
        assert rows(s.db, "moderation")[0]["action"] == "flag"
    with serve(chat_dir, tmp_path, moderation="block") as s:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key=KEY, max_retries=0)
        toxic = [{"role": "user", "content": TOXIC}]
        reply = client.chat.completions.create(model="m", messages=toxic, max_tokens=5, n=2)
        assert [c.finish_reason for c in reply.choices] == ["content_filter"] * 2
        assert reply.choices[0].message.refusal == REFUSAL and not reply.choices[0].message.content
        stream = client.chat.completions.create(model="m", messages=toxic, max_tokens=5, stream=True)
        chunks = [c.choices[0] for c in stream if c.choices]
        assert chunks[-1].finish_reason == "content_filter"
        done = client.completions.create(model="m", prompt=TOXIC, max_tokens=5)
        assert done.choices[0].finish_reason == "content_filter" and done.choices[0].text == ""
        # a clean prompt is served
        reply = client.chat.completions.create(model="m", messages=HI, temperature=0, max_tokens=60)
        assert reply.choices[0].message.content == "hello there"
        # an answer the filter flags is withheld, streaming or not (a stand-in classifier flags this model's
        # greeting: the routing of verdicts is what is tested here, the classifier above)
        server = s.server.config.app.state.server
        real = server.moderator
        monkeypatch.setattr(server, "moderator", lambda text: {**real(text), "flagged": "hello" in text})
        reply = client.chat.completions.create(model="m", messages=HI, temperature=0, max_tokens=60)
        assert reply.choices[0].finish_reason == "content_filter" and reply.choices[0].message.content is None
        text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model="m", messages=HI, temperature=0, max_tokens=60, stream=True) if c.choices)
        assert "hello" not in text
        stages = [(r["stage"], r["action"]) for r in rows(s.db, "moderation")]
        assert ("prompt", "block") in stages and ("completion", "block") in stages


def test_reload_serves_a_new_checkpoint(chat_dir, tokenizer, tmp_path):
    other = tmp_path / "other"
    torch.manual_seed(1)
    Transformer(preset("debug", vocab_size=tokenizer.vocab_size, max_position_embeddings=256)).save_pretrained(other)
    tokenizer.save(other)
    with serve(chat_dir, tmp_path) as s:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key=KEY, max_retries=0)
        ask = lambda: client.chat.completions.create(model="m", messages=HI, temperature=0,  # noqa: E731
                                                     max_tokens=20).choices[0].message.content
        assert ask() == "hello there"
        auth = {"authorization": f"Bearer {KEY}"}
        assert httpx.post(s.url + "/admin/reload", json={"model": str(other)}).status_code == 401
        r = httpx.post(s.url + "/admin/reload", json={"model": str(other)}, headers=auth, timeout=60)
        assert r.status_code == 200
        assert ask() != "hello there"
        r = httpx.post(s.url + "/admin/reload", json={"model": str(tmp_path / "missing")}, headers=auth, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == "model"
        assert httpx.post(s.url + "/admin/reload", json={}, headers=auth, timeout=60).status_code == 200
        assert ask() == "hello there" and httpx.get(s.url + "/health").json()["status"] == "ok"
