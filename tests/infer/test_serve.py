"""The OpenAI-compatible server, driven by the official `openai` client and plain HTTP, on a real socket."""

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
import uvicorn

from nanoseek.infer.engine import Engine
from nanoseek.infer.serve.app import Limits, create_app
from nanoseek.infer.serve.feedback import FeedbackStore, export
from nanoseek.model import Transformer, preset
from nanoseek.posttrain.preferences import load_pairs
from nanoseek.posttrain.sft import load_examples

openai = pytest.importorskip("openai")

HI = [{"role": "user", "content": "hi"}]


class LiveServer:
    """uvicorn on a free local port in a background thread."""

    def __init__(self, app):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("test server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=15)


@pytest.fixture(scope="module")
def live(chat_model, tokenizer, tmp_path_factory):
    db = tmp_path_factory.mktemp("feedback") / "feedback.sqlite"
    engine = Engine(chat_model, tokenizer, max_batch=4)
    app = create_app(engine, "chat-test", Limits(max_prompt_tokens=100, max_tokens_cap=80, max_queue=16),
                     FeedbackStore(db))
    with LiveServer(app) as server:
        server.db = db
        yield server


@pytest.fixture
def client(live):
    return openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0)


def streamed(client, **kw):
    reasoning, content, finish = "", "", None
    for chunk in client.chat.completions.create(stream=True, **kw):
        for choice in chunk.choices:
            reasoning += getattr(choice.delta, "reasoning_content", None) or ""
            content += choice.delta.content or ""
            finish = choice.finish_reason or finish
    return reasoning, content, finish


def test_chat_plain_and_streamed_with_the_openai_client(client):
    resp = client.chat.completions.create(model="chat-test", messages=HI, temperature=0, max_tokens=60,
                                          extra_body={"thinking": True})
    msg = resp.choices[0].message
    assert msg.content == "hello there"
    assert msg.reasoning_content == "they greet me, so I greet back"
    assert resp.choices[0].finish_reason == "stop" and resp.usage.completion_tokens > 10
    reasoning, content, finish = streamed(client, model="chat-test", messages=HI, temperature=0, max_tokens=60,
                                          extra_body={"thinking": True})
    assert (reasoning.strip(), content.strip(), finish) == (msg.reasoning_content, msg.content, "stop")


def test_sampling_parameters_n_seed_stop(client):
    kw = dict(model="chat-test", messages=HI, temperature=1.0, top_p=0.9, max_tokens=40, n=3, seed=7,
              extra_body={"thinking": True})
    a, b = client.chat.completions.create(**kw), client.chat.completions.create(**kw)
    assert len(a.choices) == 3 and [c.index for c in a.choices] == [0, 1, 2]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]  # seeded
    cut = client.chat.completions.create(model="chat-test", messages=HI, temperature=0, max_tokens=60,
                                         stop=["so I"], extra_body={"thinking": True})
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].message.reasoning_content == "they greet me,"
    short = client.chat.completions.create(model="chat-test", messages=HI, temperature=0, max_tokens=3)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 3


def test_completions_models_and_health(client, live):
    plain = client.completions.create(model="chat-test", prompt="Hello there", max_tokens=8, temperature=0)
    chunks = client.completions.create(model="chat-test", prompt="Hello there", max_tokens=8, temperature=0,
                                       stream=True)
    assert "".join(c.choices[0].text for c in chunks) == plain.choices[0].text
    two = client.completions.create(model="chat-test", prompt=["Hello", "The answer"], max_tokens=4, n=2,
                                    temperature=0)
    assert [c.index for c in two.choices] == [0, 1, 2, 3]
    assert two.choices[0].text == two.choices[1].text  # greedy samples agree
    assert [m.id for m in client.models.list().data] == ["chat-test"]
    assert httpx.get(live.url + "/health").json()["status"] == "ok"


def test_routing_and_verify_extensions(live):
    body = {"messages": HI, "temperature": 0, "max_tokens": 60, "thinking": True, "routing": True}
    r = httpx.post(live.url + "/v1/chat/completions", json=body, timeout=60).json()
    routing = r["choices"][0]["routing"]
    assert len(routing) == r["usage"]["completion_tokens"]
    assert all(len(e["experts"]) == 1 and len(e["experts"][0]) == 2 for e in routing)  # 1 MoE layer, top-2
    v = httpx.post(live.url + "/v1/chat/completions", timeout=60, json={
        "messages": HI, "temperature": 0.6, "seed": 1, "max_tokens": 60, "thinking": True, "verify": 4}).json()
    assert v["verification"]["votes"] == 4 and v["verification"]["sure"]
    assert v["choices"][0]["message"]["content"] == "hello there"


def test_eight_concurrent_clients(live):
    def one(i):
        c = openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0)
        if i % 2:
            return streamed(c, model="chat-test", messages=HI, temperature=0, max_tokens=60,
                            extra_body={"thinking": True})[1].strip()
        return c.chat.completions.create(model="chat-test", messages=HI, temperature=0, max_tokens=60,
                                         extra_body={"thinking": True}).choices[0].message.content

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(one, range(8)))
    assert answers == ["hello there"] * 8


def test_disconnected_stream_is_aborted(live):
    before = httpx.get(live.url + "/health").json()["cancelled"]
    with httpx.stream("POST", live.url + "/v1/chat/completions", timeout=60, json={
            "messages": HI, "stream": True, "max_tokens": 80, "ignore_eos": True}) as r:
        next(r.iter_lines())  # one chunk, then the connection closes
    deadline = time.time() + 10
    while httpx.get(live.url + "/health").json()["load"] and time.time() < deadline:
        time.sleep(0.05)
    health = httpx.get(live.url + "/health").json()
    assert health["load"] == 0 and health["cancelled"] == before + 1


BAD = [
    ("not json", "not valid JSON"),
    ({}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "role"),
    ({"messages": [{"role": "user"}]}, "content"),
    ({"messages": HI, "temperature": "hot"}, "temperature"),
    ({"messages": HI, "n": "2"}, "n"),
    ({"messages": HI, "max_tokens": -5}, "max_tokens"),
    ({"messages": HI, "max_tokens": 10_000}, "max_tokens"),
    ({"messages": HI, "n": 50}, "n"),
    ({"messages": HI, "top_p": 0}, "top_p"),
    ({"messages": HI, "temperature": 3}, "temperature"),
    ({"messages": HI, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"messages": [{"role": "user", "content": "hello " * 300}]}, "prompt"),
    ({"messages": HI + [{"role": "assistant", "content": "x"}]}, "last message"),
    ({"messages": HI, "verify": 3, "stream": True}, "verify"),
    ({"messages": HI, "verify": 9}, "verify"),
]


@pytest.mark.parametrize("body,needle", BAD)
def test_bad_requests_get_400_with_a_readable_message(live, body, needle):
    content = body if isinstance(body, str) else json.dumps(body)
    r = httpx.post(live.url + "/v1/chat/completions", content=content, headers={"content-type": "application/json"})
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and needle in error["message"]


def test_bad_completion_requests_and_unknown_paths(live):
    r = httpx.post(live.url + "/v1/completions", json={"prompt": [1, 99999]})
    assert r.status_code == 400 and "vocabulary" in r.json()["error"]["message"]
    r = httpx.post(live.url + "/v1/completions", json={"prompt": []})
    assert r.status_code == 400 and "prompt" in r.json()["error"]["message"]
    r = httpx.get(live.url + "/etc/passwd")
    assert r.status_code == 404 and "error" in r.json()


def test_feedback_is_stored_and_exported(client, live, tmp_path, tokenizer):
    good = client.chat.completions.create(model="chat-test", messages=HI, temperature=0, max_tokens=60,
                                          extra_body={"thinking": True})
    bad = client.chat.completions.create(model="chat-test", messages=HI, temperature=0, max_tokens=5,
                                         extra_body={"thinking": True})
    for completion, rating in ((good, 1), (bad, -1)):
        r = httpx.post(live.url + "/v1/feedback", json={"completion_id": completion.id, "rating": rating,
                                                        "comment": "cut short" if rating < 0 else ""})
        assert r.status_code == 200
    r = httpx.post(live.url + "/v1/feedback", json={"completion_id": "chatcmpl-nope", "rating": 1})
    assert r.status_code == 400 and "no completion" in r.json()["error"]["message"]
    r = httpx.post(live.url + "/v1/feedback", json={"completion_id": good.id, "rating": 5})
    assert r.status_code == 400 and "rating" in r.json()["error"]["message"]
    counts = export(live.db, tmp_path)
    assert counts["sft"] >= 1 and counts["preference"] >= 1 and counts["review"] >= 1
    sft = [json.loads(line) for line in (tmp_path / "sft.jsonl").read_text().splitlines()]
    assert sft[-1]["messages"][0] == HI[0]
    assert sft[-1]["messages"][-1]["content"].startswith("<think>\nthey greet me")  # reasoning kept for SFT
    pair = json.loads((tmp_path / "preference.jsonl").read_text().splitlines()[-1])
    assert pair["prompt"] == HI and pair["chosen"][0]["content"] != pair["rejected"][0]["content"]
    # what the trainers read: the SFT conversations and the pairs (TRL's conversational preference format)
    examples, skipped = load_examples([tmp_path / "sft.jsonl"], tokenizer, 4096, skip_invalid=False)
    pairs, skipped_pairs = load_pairs(tmp_path / "preference.jsonl", tokenizer, 4096)
    assert len(examples) == counts["sft"] and len(pairs) == counts["preference"]
    assert not any(skipped.values()) and not any(skipped_pairs.values())


def test_full_queue_gets_429_and_unsure_verify_is_logged(tokenizer, tmp_path):
    torch.manual_seed(0)
    model = Transformer(preset("debug", vocab_size=tokenizer.vocab_size)).eval()  # untrained: no answers
    db = tmp_path / "fb.sqlite"
    app = create_app(Engine(model, tokenizer, max_batch=2), "random", Limits(max_queue=0), FeedbackStore(db))
    with LiveServer(app) as server:
        v = httpx.post(server.url + "/v1/chat/completions", timeout=60, json={
            "messages": HI, "verify": 2, "max_tokens": 8, "seed": 0, "thinking": False}).json()
        assert not v["verification"]["sure"] and v["choices"][0]["message"]["content"].startswith("I'm not sure")
        body = {"messages": HI, "stream": True, "n": 2, "max_tokens": 400, "ignore_eos": True}
        with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as first:
            lines = first.iter_lines()  # keep the iterator: dropping it closes the connection
            next(lines)  # running: both rows busy, no queue
            r = httpx.post(server.url + "/v1/chat/completions", json={"messages": HI, "max_tokens": 4})
            assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
    assert [row["kind"] for row in FeedbackStore(db).feedback()] == ["low_confidence"]
