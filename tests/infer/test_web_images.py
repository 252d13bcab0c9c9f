"""The web page's image upload in headless Chromium: the chosen file is shown in the conversation, goes out as a
data-URL content part, and the answer that arrives is the one the API gives for the same image; a text-only model's
refusal is shown and leaves the conversation usable. Skips without chromium, as test_web.py does."""

import base64

import pytest
from PIL import Image

from nanoseek.infer.engine import Engine, load_engine
from nanoseek.infer.serve.app import Limits, create_app

from .test_serve import LiveServer
from .test_web import By, WebDriverWait, browser  # noqa: F401 (the fixture; importing skips without chromium)

openai = pytest.importorskip("openai")


def upload(driver, path, text: str) -> None:
    driver.find_element(By.ID, "image").send_keys(str(path))
    WebDriverWait(driver, 10).until(lambda d: d.find_element(By.ID, "preview").get_attribute("src"))
    driver.find_element(By.ID, "input").send_keys(text)
    driver.find_element(By.ID, "send").click()


def settle(driver, replies: int):
    WebDriverWait(driver, 60).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".assistant[data-done=true]"))
                                    == replies)
    return driver.find_elements(By.CSS_SELECTOR, ".assistant")[-1]


@pytest.fixture
def picture(tmp_path):
    path = tmp_path / "square.png"
    im = Image.new("RGB", (40, 40), (200, 30, 30))
    im.paste((20, 40, 220), (10, 10, 20, 20))
    im.save(path)
    return path


def test_uploaded_image_is_shown_and_answered(browser, vl_dir, picture):  # noqa: F811
    app = create_app(load_engine(vl_dir, max_batch=2), "web-vl", Limits(max_tokens_cap=8), None, moderation="off")
    with LiveServer(app) as server:
        browser.get(server.url + "/")
        WebDriverWait(browser, 20).until(lambda d: d.find_element(By.ID, "model").text == "web-vl")
        browser.find_element(By.ID, "think").click()  # direct answers: all the text is the answer
        browser.find_element(By.ID, "temperature").clear()
        browser.find_element(By.ID, "temperature").send_keys("0")
        upload(browser, picture, "what colour is the square?")
        reply = settle(browser, 1)
        img = browser.find_element(By.CSS_SELECTOR, ".user img.upload")
        assert img.get_attribute("src").startswith("data:image/png;base64,")
        assert browser.execute_script("return arguments[0].naturalWidth", img) == 40  # decoded and displayed
        assert not reply.find_elements(By.CSS_SELECTOR, ".error")
        assert reply.find_elements(By.CSS_SELECTOR, ".feedback button")  # the answer's stream arrived
        url = "data:image/png;base64," + base64.b64encode(picture.read_bytes()).decode()
        api = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        expected = api.chat.completions.create(model="web-vl", temperature=0, extra_body={"thinking": False},
                                               messages=[{"role": "user", "content": [
                                                   {"type": "image_url", "image_url": {"url": url}},
                                                   {"type": "text", "text": "what colour is the square?"}]}])
        assert reply.find_element(By.CSS_SELECTOR, ".answer").text == expected.choices[0].message.content.strip()
        assert browser.find_element(By.ID, "preview").get_attribute("src") is None  # cleared for the next message


def test_text_only_model_refusal_is_shown(browser, chat_model, tokenizer, picture):  # noqa: F811
    app = create_app(Engine(chat_model, tokenizer, max_batch=2), "web-text", Limits(max_tokens_cap=80), None,
                     moderation="off")
    with LiveServer(app) as server:
        browser.get(server.url + "/")
        WebDriverWait(browser, 20).until(lambda d: d.find_element(By.ID, "model").text == "web-text")
        upload(browser, picture, "hi")
        reply = settle(browser, 1)
        assert "this model takes no images" in reply.find_element(By.CSS_SELECTOR, ".error").text
        browser.find_element(By.ID, "temperature").clear()
        browser.find_element(By.ID, "temperature").send_keys("0")
        browser.find_element(By.ID, "input").send_keys("hi")  # the refused turn left the history
        browser.find_element(By.ID, "send").click()
        assert settle(browser, 2).find_element(By.CSS_SELECTOR, ".answer").text == "hello there"
