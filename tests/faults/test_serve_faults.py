"""The inference server under faults (issue 13), against a debug-size model on a loopback socket: request fields
beyond their range, long stop strings, clients that leave, oversized bodies, failures inside the engine thread,
and generated request bodies. Whatever a request says, the answer is a 200 or a 4xx, and the server stays healthy;
a fault inside the engine fails the request it hit and no other."""

import json
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nanoseek.infer.engine import Engine, TextStream
from nanoseek.infer.sampling import RowParams, SamplingParams
from nanoseek.infer.serve.app import Limits, create_app
from nanoseek.infer.serve.feedback import FeedbackStore
from nanoseek.infer.serve.protocol import MAX_STOP_CHARS
from nanoseek.model import Transformer, preset
from tests.infer.test_serve import LiveServer

HI = [{"role": "user", "content": "hi"}]
CHAT, COMPLETIONS, FEEDBACK = "/v1/chat/completions", "/v1/completions", "/v1/feedback"
MINIMAL = {CHAT: {"messages": HI}, COMPLETIONS: {"prompt": "hi"}}
BODY_LIMIT = 64 * 1024


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    return Transformer(preset("debug", vocab_size=tokenizer.vocab_size, max_position_embeddings=256)).eval()


@pytest.fixture(scope="module")
def live(model, tokenizer, tmp_path_factory):
    """A server whose answers are short (max_tokens <= 8), so thousands of generated requests take a minute."""
    db = tmp_path_factory.mktemp("feedback") / "feedback.sqlite"
    limits = Limits(max_body_bytes=BODY_LIMIT, max_prompt_tokens=100, max_tokens_cap=8, max_queue=16)
    with LiveServer(create_app(Engine(model, tokenizer, max_batch=4), "faults", limits, FeedbackStore(db))) as server:
        yield server


@pytest.fixture(scope="module")
def slow(model, tokenizer):
    """A server whose engine takes >= 20 ms a step, so a long generation is still running while a test acts."""
    engine = Engine(model, tokenizer, max_batch=4)
    step = engine.step

    def slow_step():
        time.sleep(0.02)
        return step()

    engine.step = slow_step
    with LiveServer(create_app(engine, "slow", Limits(max_prompt_tokens=100, max_tokens_cap=200))) as server:
        server.engine = engine
        yield server


def post(server, path: str, body, timeout: float = 30) -> httpx.Response:
    return httpx.post(server.url + path, json=body, timeout=timeout)


def health(server) -> dict:
    r = httpx.get(server.url + "/health", timeout=10)
    assert r.status_code == 200
    return r.json()


def wait_idle(server, within: float) -> dict:
    """/health once the server counts no request and the engine (where the test holds it) has dropped them too,
    or after `within` seconds. A cancelled request leaves the count at once and the engine at the worker
    thread's next step, so both are waited for."""
    deadline = time.time() + within
    engine = getattr(server, "engine", None)
    while ((h := health(server))["load"] or (engine is not None and engine.has_work())) and time.time() < deadline:
        time.sleep(0.05)
    return h


# --- every request field has a range --------------------------------------------------------------------------
OUT_OF_RANGE = [("top_k", 2**63), ("top_k", 2**31), ("top_k", -1), ("n", 2**63), ("n", 0), ("max_tokens", 2**63),
                ("max_tokens", 0), ("seed", 2**63), ("seed", -2**63 - 1), ("stop", ["z" * (MAX_STOP_CHARS + 1)]),
                ("stop", ["a", "b", "c", "d", "e"])]


@pytest.mark.parametrize("path", [CHAT, COMPLETIONS])
@pytest.mark.parametrize("field,value", OUT_OF_RANGE)
def test_fields_beyond_their_range_get_400_naming_the_field(live, path, field, value):
    """top_k >= 2^63 used to pass, overflow on the engine's thread and leave the server answering 503."""
    r = post(live, path, {**MINIMAL[path], "max_tokens": 3, field: value})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == field and r.json()["error"]["type"] == "invalid_request_error"
    assert health(live)["status"] == "ok"


@pytest.mark.parametrize("field,value", [("verify", 2**63), ("max_completion_tokens", 2**63)])
def test_chat_extension_fields_beyond_their_range_get_400(live, field, value):
    r = post(live, CHAT, {"messages": HI, field: value})
    assert r.status_code == 400 and r.json()["error"]["param"] == field


@pytest.mark.parametrize("path", [CHAT, COMPLETIONS])
def test_the_ends_of_every_range_are_served(live, path):
    body = {**MINIMAL[path], "top_k": 2**31 - 1, "seed": 2**63 - 1, "stop": ["z" * MAX_STOP_CHARS] * 4,
            "temperature": 2.0, "top_p": 1e-9, "min_p": 1.0, "presence_penalty": -2.0, "frequency_penalty": 2.0,
            "repetition_penalty": 10.0, "max_tokens": 8, "n": 4}
    r = post(live, path, body)
    assert r.status_code == 200 and len(r.json()["choices"]) == 4


def test_the_engine_refuses_what_its_tensors_cannot_hold():
    with pytest.raises(ValueError, match="top_k"):
        SamplingParams(top_k=2**63)


def test_feedback_choice_beyond_its_range_gets_400(live):
    """choice >= 2^63 overflowed SQLite's integer: a 500."""
    r = post(live, FEEDBACK, {"completion_id": "chatcmpl-x", "rating": 1, "choice": 2**63})
    assert r.status_code == 400 and r.json()["error"]["param"] == "choice"


# --- stop strings -----------------------------------------------------------------------------------------
class Chars:
    """A tokenizer whose ids are code points (TextStream sees exactly the characters a test pushes)."""

    @staticmethod
    def decode(ids):
        return "".join(map(chr, ids))


def test_long_stop_strings_cost_time_linear_in_the_text():
    """4 stop strings of 250k characters made each token cost seconds (every prefix of every stop string was
    compared at every token): another client's 5-token request took 22.9 s."""
    start = time.perf_counter()
    stream = TextStream(Chars(), ["z" * 250_000] * 4)
    released = [stream.push(ord("z")) for _ in range(8)]
    assert time.perf_counter() - start < 3  # about 0.1 s, the four tables; the old check took ~3 s a token
    assert released == [("", False)] * 8 and stream.flush() == "z" * 8  # held back until ruled out


@given(text=st.text("abc", max_size=30), stops=st.lists(st.text("abc", min_size=1, max_size=4), max_size=4))
@settings(max_examples=300, deadline=None, database=None, derandomize=True)
def test_text_stream_cuts_at_the_first_stop_string_to_end(text, stops):
    """Against a reference: the text is cut where the stop string that ends first begins (the longest, when
    several end together), and the streamed pieces (released as soon as no stop string can start in them) add up
    to that text."""
    ends = sorted((text.find(s) + len(s), -len(s)) for s in stops if s in text)
    expected = text[:ends[0][0] + ends[0][1]] if ends else text
    stream = TextStream(Chars(), stops)
    pieces, stopped = [], False
    for char in text:
        piece, stopped = stream.push(ord(char))
        pieces.append(piece)
        if stopped:
            break
    if not stopped:
        pieces.append(stream.flush())
    assert ("".join(pieces), stopped) == (expected, bool(ends))


# --- clients that leave -----------------------------------------------------------------------------------
@pytest.mark.parametrize("path", [CHAT, COMPLETIONS])
def test_a_non_streaming_client_that_leaves_stops_its_generation(slow, path):
    """200 tokens take the slow engine >= 4 s; the client gives up after 0.5 s and its row must be freed well
    before the rest would be generated."""
    cancelled = health(slow)["cancelled"]
    with pytest.raises(httpx.ReadTimeout):
        post(slow, path, {**MINIMAL[path], "max_tokens": 200, "ignore_eos": True}, timeout=0.5)
    h = wait_idle(slow, within=2.0)
    assert h["load"] == 0 and h["cancelled"] == cancelled + 1 and not slow.engine.has_work()


# --- request size -----------------------------------------------------------------------------------------
def test_bodies_over_the_limit_get_413(live):
    big = {"messages": [{"role": "user", "content": "x" * BODY_LIMIT}]}
    r = post(live, CHAT, big)  # refused by its Content-Length
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    chunks = (b"x" * 4096 for _ in range(BODY_LIMIT // 4096 + 2))  # chunked: no length, refused while reading
    r = httpx.post(live.url + COMPLETIONS, content=chunks, timeout=30, headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert health(live)["status"] == "ok"


def test_a_prompt_over_the_limit_gets_400(live):
    r = post(live, CHAT, {"messages": [{"role": "user", "content": "hello " * 5000}]})
    assert r.status_code == 400 and "prompt" in r.json()["error"]["message"]
    r = post(live, COMPLETIONS, {"prompt": ["hi"] * 1000})  # refused before tokenising 1000 prompts
    assert r.status_code == 400 and "prompts" in r.json()["error"]["message"]


def test_tokenising_a_prompt_does_not_hold_up_other_clients(live, tokenizer, monkeypatch):
    """A 10 MB prompt was tokenised on the event loop: /health took 8.9 s meanwhile."""
    template = tokenizer.apply_chat_template

    def slow_template(*args, **kwargs):
        time.sleep(1.5)  # blocks the thread it runs on, as a long prompt does
        return template(*args, **kwargs)

    monkeypatch.setattr(tokenizer, "apply_chat_template", slow_template)
    with ThreadPoolExecutor(1) as pool:
        chat = pool.submit(post, live, CHAT, {"messages": HI, "max_tokens": 2})
        time.sleep(0.2)
        start = time.perf_counter()
        assert health(live)["status"] == "ok"
        assert time.perf_counter() - start < 0.75
        assert chat.result().status_code == 200


# --- faults inside the engine thread ---------------------------------------------------------------------
FAULT = "\x00fault"  # a stop string that marks the request whose row fails


@pytest.fixture
def faulty_row(monkeypatch):
    """Detokenisation fails at the third token of every sample whose stop strings include FAULT: one row of a
    running batch raises on the engine's thread."""
    push = TextStream.push

    def failing_push(self, token):
        if FAULT in self.stop and len(self.ids) == 2:
            raise RuntimeError("injected fault")
        return push(self, token)

    monkeypatch.setattr(TextStream, "push", failing_push)


def test_a_failing_sample_raises_from_generate_and_leaves_the_engine_empty(model, tokenizer, faulty_row):
    engine = Engine(model, tokenizer, max_batch=4)
    ids = tokenizer.encode("hi", bos=True)
    params = [SamplingParams(max_tokens=8, ignore_eos=True, stop=stop) for stop in ([], [FAULT])]
    with pytest.raises(RuntimeError, match="injected fault"):
        engine.generate([ids, ids], params)
    assert not engine.has_work()
    assert engine.generate([ids], params[0])[0].finish_reason == "length"


def start_long_request(server) -> tuple:
    """A 40-token request on the slow engine (>= 0.8 s), in a thread; returns once it is running."""
    pool = ThreadPoolExecutor(1)
    future = pool.submit(post, server, CHAT, {"messages": HI, "max_tokens": 40, "ignore_eos": True})
    deadline = time.time() + 10
    while not health(server)["load"] and time.time() < deadline:
        time.sleep(0.01)
    return pool, future


def assert_healthy_and_serving(server):
    h = wait_idle(server, within=10)
    assert h["status"] == "ok" and h["load"] == 0
    r = post(server, CHAT, {"messages": HI, "max_tokens": 3, "ignore_eos": True})
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize("path", [CHAT, COMPLETIONS])
def test_a_row_that_fails_fails_its_request_only(slow, faulty_row, path):
    pool, other = start_long_request(slow)
    with pool:
        r = post(slow, path, {**MINIMAL[path], "stop": [FAULT], "max_tokens": 20, "ignore_eos": True})
        assert r.status_code == 500
        error = r.json()["error"]
        assert error["type"] == "server_error" and "injected fault" in error["message"]
        done = other.result()
    assert done.status_code == 200  # the request beside it in the batch ran to the end
    assert done.json()["usage"]["completion_tokens"] == 40 and done.json()["choices"][0]["finish_reason"] == "length"
    assert_healthy_and_serving(slow)


@pytest.mark.parametrize("path", [CHAT, COMPLETIONS])
def test_a_stream_that_fails_ends_with_an_error_event(slow, faulty_row, path):
    """The stream used to stop without a word; now its last event is an OpenAI-style error (no [DONE])."""
    body = {**MINIMAL[path], "stop": [FAULT], "max_tokens": 20, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", slow.url + path, json=body, timeout=30) as r:
        assert r.status_code == 200  # sent before the fault
        events = [line.removeprefix("data: ") for line in r.iter_lines() if line.startswith("data: ")]
    assert "[DONE]" not in events
    error = json.loads(events[-1])["error"]
    assert error["type"] == "server_error" and "injected fault" in error["message"]
    assert_healthy_and_serving(slow)


def test_a_step_that_fails_fails_the_requests_it_held_and_the_server_goes_on(slow, monkeypatch):
    """A batched step that raises (a bug, out of memory) cannot be pinned on one row: its requests get 500, the
    engine drops them and serves the next request; /health stays 200."""
    engine = slow.engine
    decode = engine._decode
    failed = threading.Event()

    def decode_once_failing():
        if not failed.is_set():
            failed.set()
            raise RuntimeError("injected step fault")
        return decode()

    monkeypatch.setattr(engine, "_decode", decode_once_failing)
    r = post(slow, CHAT, {"messages": HI, "max_tokens": 5, "ignore_eos": True})
    assert r.status_code == 500 and "injected step fault" in r.json()["error"]["message"]
    assert_healthy_and_serving(slow)


def test_a_row_the_batch_cannot_hold_fails_its_step_and_the_engine_goes_on(slow, monkeypatch):
    """The shape of the top_k >= 2^63 bug with the range check bypassed: a row whose parameters the batch's
    tensors cannot hold joins a running batch and the step raises. That step's requests fail (500), the engine
    drops them (the running one first, which rebuilds the batch around the bad row and raises again) and serves
    the next request; the server used to answer 503 to everything until restarted."""
    stack = RowParams.stack

    def failing_stack(params, device="cpu"):
        if any(p.top_k == 777 for p in params):
            raise ValueError("Overflow when unpacking long long")
        return stack(params, device)

    monkeypatch.setattr(RowParams, "stack", failing_stack)
    pool, running = start_long_request(slow)
    with pool:
        r = post(slow, CHAT, {"messages": HI, "top_k": 777, "max_tokens": 5})
        assert r.status_code == 500 and "Overflow" in r.json()["error"]["message"]
        assert running.result().status_code == 500  # it shared the step that failed
    assert_healthy_and_serving(slow)


# --- generated request bodies: never a 5xx ----------------------------------------------------------------
TEXT = st.text(st.characters(exclude_categories=()), max_size=24)  # any code point, lone surrogates too
EDGES = st.sampled_from([2**31 - 1, 2**31, 2**63 - 1, 2**63, 2**64, -2**63 - 1])  # where machine integers end
JUNK = st.one_of(st.none(), st.booleans(), st.integers(), st.integers(-2**80, 2**80), st.floats(), TEXT,
                 st.lists(st.integers(), max_size=3), st.dictionaries(TEXT, TEXT, max_size=2))
MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]), "content": st.one_of(
    TEXT, st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": TEXT}), max_size=2))})
USER_LAST = st.tuples(st.lists(MESSAGE, max_size=2), TEXT).map(lambda m: [*m[0], {"role": "user", "content": m[1]}])
SAMPLING = {  # in range for the `live` server (n <= 4, max_tokens <= 8)
    "model": TEXT, "max_tokens": st.integers(1, 8), "temperature": st.floats(0, 2),
    "top_p": st.floats(0, 1, exclude_min=True), "top_k": st.integers(0, 2**31 - 1), "min_p": st.floats(0, 1),
    "n": st.integers(1, 4), "stop": st.one_of(TEXT.filter(bool), st.lists(st.text(min_size=1, max_size=MAX_STOP_CHARS),
                                                                          max_size=4)),
    "seed": st.integers(-2**63, 2**63 - 1), "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "presence_penalty": st.floats(-2, 2), "frequency_penalty": st.floats(-2, 2),
    "repetition_penalty": st.floats(0.1, 10), "ignore_eos": st.booleans()}
CHAT_FIELDS = {**SAMPLING, "max_completion_tokens": st.integers(1, 8), "thinking": st.one_of(st.none(), st.booleans()),
               "routing": st.booleans()}
PROMPT = st.one_of(TEXT, st.lists(TEXT, min_size=1, max_size=2), st.lists(st.integers(0, 300), min_size=1, max_size=5))
FEEDBACK_FIELDS = {"completion_id": TEXT, "choice": st.integers(0, 127), "messages": st.lists(MESSAGE, max_size=2),
                   "response": TEXT, "comment": TEXT}
ENDPOINT_FIELDS = [(CHAT, {"messages": USER_LAST}, {**CHAT_FIELDS, "verify": st.just(2)}),
                   (COMPLETIONS, {"prompt": PROMPT}, SAMPLING),
                   (FEEDBACK, {"rating": st.sampled_from([-1, 1])}, FEEDBACK_FIELDS)]


INTEGER_FIELDS = {"max_tokens", "max_completion_tokens", "top_k", "n", "seed", "verify", "choice"}


def bodies(required: dict, optional: dict, bad: st.SearchStrategy | None = None,
           fields: list[str] | None = None) -> st.SearchStrategy[dict]:
    """The required fields and any subset of the optional ones, in range; then, given `bad`, one of `fields`
    (default: any) set to a value drawn from it, so that the others can carry it to the engine."""
    body = st.fixed_dictionaries(required, optional=optional)
    if bad is None:
        return body
    fields = fields or [*required, *optional]
    return st.tuples(body, st.sampled_from(fields), bad).map(lambda b: {**b[0], b[1]: b[2]})


REQUESTS = st.one_of(  # (path, body, whether its JSON escapes every non-ASCII character)
    *[st.tuples(st.just(path), body, st.booleans()) for path, required, optional in ENDPOINT_FIELDS
      for body in (bodies(required, optional), bodies(required, optional, JUNK),
                   bodies(required, optional, EDGES, sorted(INTEGER_FIELDS & optional.keys())))],
    st.tuples(st.sampled_from([CHAT, COMPLETIONS, FEEDBACK]), st.one_of(JUNK, st.binary(max_size=40)), st.booleans()))


def send(server, path: str, body, ascii_only: bool) -> int:
    """POST a generated body (bytes as they are, anything else as JSON) and read the whole answer; streams must
    not end in an error event either. Returns the status."""
    content = body if isinstance(body, bytes) else json.dumps(body, ensure_ascii=ascii_only).encode(
        "utf-8", "surrogatepass")
    with httpx.stream("POST", server.url + path, content=content, timeout=60,
                      headers={"content-type": "application/json"}) as r:
        text = r.read().decode("utf-8", "replace")
    if r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream"):
        events = [line.removeprefix("data: ") for line in text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]", events[-1]
    return r.status_code


def check_generated_requests(server, examples: int, derandomize: bool) -> Counter:
    """Send `examples` generated requests; every answer must be 200 or 4xx, and the server healthy at the end."""
    statuses: Counter = Counter()

    @given(REQUESTS)
    @settings(max_examples=examples, deadline=None, database=None, derandomize=derandomize,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    def one(request):
        status = send(server, *request)
        statuses[status] += 1
        assert status == 200 or 400 <= status < 500, (request, status)

    one()
    h = wait_idle(server, within=30)
    assert h["status"] == "ok" and h["load"] == 0
    assert post(server, CHAT, {"messages": HI, "max_tokens": 2}).status_code == 200
    return statuses


def test_generated_requests_never_get_a_5xx(live):
    statuses = check_generated_requests(live, examples=80, derandomize=True)
    assert statuses[200] >= 5 and sum(statuses.values()) == 80  # some bodies were served, not only refused


@pytest.mark.slow
def test_thousands_of_generated_requests_never_get_a_5xx(live):
    start = time.perf_counter()
    statuses = check_generated_requests(live, examples=2500, derandomize=False)
    total = sum(statuses.values())
    print(f"{total} generated requests in {time.perf_counter() - start:.0f} s: {dict(sorted(statuses.items()))}")
    assert total >= 2000 and not any(status >= 500 for status in statuses)
