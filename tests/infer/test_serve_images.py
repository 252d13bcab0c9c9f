"""Image input to `nanoseek serve`: OpenAI `image_url` content parts through the official `openai` client, on a VL
checkpoint built from the trained chat model (conftest's `vl_dir`, loaded as `nanoseek serve` loads it), and the 400s of
every kind of bad image, with the server serving on."""

import base64
import io
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from PIL import Image

import nanoseek
from nanoseek.data.tokenizer import Tokenizer
from nanoseek.infer.engine import Engine, load_engine
from nanoseek.infer.reasoning import split_reasoning
from nanoseek.infer.serve.app import Limits, create_app
from nanoseek.model.vision import to_pixels

from .test_serve import LiveServer

openai = pytest.importorskip("openai")

HI = [{"role": "user", "content": "hi"}]


def picture(fmt: str = "PNG", size: tuple[int, int] = (40, 40), frames: int = 1) -> bytes:
    """A red image with a blue square (a GIF with `frames` frames, each another colour)."""
    ims = []
    for k in range(frames):
        im = Image.new("RGB", size, (200, 30 + 60 * k, 30))
        im.paste((20, 40, 220), (size[0] // 4, size[1] // 4, size[0] // 2, size[1] // 2))
        ims.append(im)
    buf = io.BytesIO()
    ims[0].save(buf, fmt, **({"save_all": True, "append_images": ims[1:]} if frames > 1 else {}))
    return buf.getvalue()


def data_url(data: bytes, media: str = "image/png") -> str:
    return f"data:{media};base64,{base64.b64encode(data).decode()}"


def ask(url: str, text: str = "what colour is the square?", role: str = "user") -> list[dict]:
    return [{"role": role, "content": [{"type": "image_url", "image_url": {"url": url}},
                                       {"type": "text", "text": text}]}]


def png_bomb(side: int = 100_000) -> bytes:
    """A PNG whose header claims side x side pixels over a few bytes of data (a decompression bomb's start)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def live(vl_dir):
    engine = load_engine(vl_dir, max_batch=4)
    app = create_app(engine, "vl-test", Limits(max_prompt_tokens=200, max_tokens_cap=80, max_images=2,
                                               max_image_pixels=10_000), None, moderation="off")
    with LiveServer(app) as server:
        yield server


@pytest.fixture
def client(live):
    return openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0)


def test_image_answer_equals_vl_generate_with_the_same_pixels(client, vl_dir):
    url = data_url(picture())
    resp = client.chat.completions.create(model="vl-test", messages=ask(url), temperature=0, max_tokens=8,
                                          extra_body={"thinking": False, "ignore_eos": True})
    model, tok = nanoseek.load(vl_dir), Tokenizer.load(vl_dir)
    n = model.vl_config.image_tokens
    ids = tok.encode_chat([{"role": "user", "content": "<image>\nwhat colour is the square?"}], True, False,
                          image_tokens=n)[0]  # an image part is `<image>\n` at its place
    pixels = to_pixels([Image.open(io.BytesIO(picture()))], model.vl_config.vision.image_size)
    expected = model.generate(torch.tensor([ids]), 8, images=pixels)[0, len(ids):].tolist()
    assert resp.usage.prompt_tokens == len(ids) and ids.count(tok.image_id) == n
    assert resp.usage.completion_tokens == 8
    assert resp.choices[0].message.content == split_reasoning(tok.decode(expected), thinking=False)[1]


@pytest.mark.parametrize("fmt,media,frames", [("JPEG", "image/jpeg", 1), ("WEBP", "image/webp", 1),
                                              ("GIF", "image/gif", 3)])
def test_jpeg_webp_and_gif_streamed(client, fmt, media, frames):
    chunks = client.chat.completions.create(model="vl-test", messages=ask(data_url(picture(fmt, frames=frames),
                                                                                   media)),
                                            temperature=0, max_tokens=4, stream=True,
                                            extra_body={"ignore_eos": True})
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length"


def test_text_turns_and_images_together(client):
    """A text-only request to the VL server answers as the chat model did; two images in one message work."""
    text = client.chat.completions.create(model="vl-test", messages=HI, temperature=0, max_tokens=60,
                                          extra_body={"thinking": True})
    assert text.choices[0].message.content == "hello there"
    two = [{"role": "user", "content": [{"type": "text", "text": "compare"},
                                        {"type": "image_url", "image_url": {"url": data_url(picture())}},
                                        {"type": "image_url", "image_url": {"url": data_url(picture("JPEG")),
                                                                            "detail": "low"}}]}]
    resp = client.chat.completions.create(model="vl-test", messages=two, temperature=0, max_tokens=3,
                                          extra_body={"ignore_eos": True})
    assert resp.usage.completion_tokens == 3


TIFF = picture("TIFF")
BAD = [
    (data_url(b"hello, not an image"), "not an image"),
    (data_url(picture()[:60]), "truncated"),
    (data_url(picture(size=(200, 100))), "more than 10,000 pixels"),
    (data_url(png_bomb()), "not an image (DecompressionBomb"),  # refused from the header, never decoded
    (data_url(TIFF, "image/tiff"), "unsupported image format TIFF"),
    ("https://example.com/cat.png", "not fetched"),
    ("http://169.254.169.254/latest/meta-data", "not fetched"),
    ("data:image/png;base64", "malformed data URL"),
    ("data:image/png;base64,%%%not-base64", "not valid base64"),
    ("data:image/png," + "x" * 10, "must be base64"),
    ("data:text/plain;base64,aGVsbG8=", "not an image"),
    ("ftp://example.com/a.png", "unsupported image URL"),
    ("file:///etc/passwd", "file URLs are refused"),
]


@pytest.mark.parametrize("url,needle", BAD, ids=[n for _, n in BAD])
def test_bad_images_get_400_with_the_openai_error_body(client, url, needle):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="vl-test", messages=ask(url), max_tokens=4)
    error = info.value.body
    assert info.value.status_code == 400 and needle in error["message"], error
    assert error["type"] == "invalid_request_error" and error["param"] == "messages"
    assert error["message"].startswith("messages[0].content[0]: ") and error["code"] == "invalid_image"


MISUSE = [
    (ask(data_url(picture()), role="system") + HI, "images go in user messages"),
    ([{"role": "user", "content": "look: <image> here"}], "reserves for images"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(picture())}}] * 3}],
     "at most 2"),
    ([{"role": "user", "content": [{"type": "audio", "data": "x"}]}], "does not match any of the expected tags"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": "data:image/png;base64,AA=="}]}],
     "image_url: Input should be an object"),
]


@pytest.mark.parametrize("messages,needle", MISUSE, ids=[n for _, n in MISUSE])
def test_misplaced_or_malformed_image_parts_get_400(live, messages, needle):
    r = httpx.post(live.url + "/v1/chat/completions", json={"messages": messages, "max_tokens": 4})
    assert r.status_code == 400 and needle in r.json()["error"]["message"], r.json()
    assert r.json()["error"]["type"] == "invalid_request_error"


def test_bad_images_do_not_disturb_concurrent_requests(live):
    good = data_url(picture())

    def one(i):
        c = openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0)
        if i % 3 == 0:
            return c.chat.completions.create(model="vl-test", messages=HI, temperature=0, max_tokens=60,
                                             extra_body={"thinking": True}).choices[0].message.content
        if i % 3 == 1:
            try:
                c.chat.completions.create(model="vl-test", messages=ask(BAD[i % len(BAD)][0]), max_tokens=4)
            except openai.BadRequestError as e:
                return e.status_code
            return "accepted"
        return c.chat.completions.create(model="vl-test", messages=ask(good), temperature=0, max_tokens=6,
                                         extra_body={"ignore_eos": True}).usage.completion_tokens

    with ThreadPoolExecutor(9) as pool:
        answers = list(pool.map(one, range(9)))
    assert answers == ["hello there", 400, 6] * 3
    assert httpx.get(live.url + "/health").json()["status"] == "ok"


def test_text_only_model_refuses_images(chat_model, tokenizer):
    app = create_app(Engine(chat_model, tokenizer, max_batch=2), "text-test", Limits(), None, moderation="off")
    with LiveServer(app) as server:
        c = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.BadRequestError) as info:
            c.chat.completions.create(model="text-test", messages=ask(data_url(picture())), max_tokens=4)
        error = info.value.body
        assert "this model takes no images" in error["message"] and error["type"] == "invalid_request_error"
        assert error["code"] == "images_not_supported"
        # "<image>" is plain text to a text-only model
        r = c.chat.completions.create(model="text-test", messages=[{"role": "user", "content": "<image> hi"}],
                                      max_tokens=2)
        assert r.choices[0].finish_reason in ("stop", "length")


def test_file_urls_only_inside_the_allowed_directory(vl_dir, tmp_path):
    allowed = tmp_path / "images"
    allowed.mkdir()
    (allowed / "square.png").write_bytes(picture())
    (tmp_path / "secret.png").write_bytes(picture())
    (allowed / "link.png").symlink_to(tmp_path / "secret.png")
    app = create_app(load_engine(vl_dir, max_batch=2), "vl-files", Limits(local_images_dir=allowed), None,
                     moderation="off")
    with LiveServer(app) as server:
        c = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        r = c.chat.completions.create(model="vl-files", messages=ask((allowed / "square.png").as_uri()),
                                      max_tokens=3, extra_body={"ignore_eos": True})
        assert r.usage.completion_tokens == 3
        for path, needle in [(tmp_path / "secret.png", "outside"), (allowed / "link.png", "outside"),
                             (allowed / ".." / "secret.png", "outside"), (allowed / "missing.png", "no such")]:
            with pytest.raises(openai.BadRequestError) as info:
                c.chat.completions.create(model="vl-files", messages=ask("file://" + str(path)), max_tokens=3)
            assert needle in info.value.body["message"]
