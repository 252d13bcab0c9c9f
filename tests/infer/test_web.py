"""The web chat page in headless Chromium (Debian's chromium + chromedriver, driven by Selenium): a message goes
out, the answer streams in, the reasoning sits in a collapsible panel, and the expert-routing grid fills.

Setup (as .ci/run does): apt-get install -y chromium chromium-driver && pip install selenium
"""

import shutil

import pytest

from nanoseek.infer.engine import Engine
from nanoseek.infer.serve.app import Limits, create_app

from .test_serve import LiveServer

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
if not (CHROMIUM and CHROMEDRIVER):
    pytest.skip("headless Chromium test needs Debian's chromium and chromedriver "
                "(apt-get install -y chromium chromium-driver)", allow_module_level=True)
webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (pip install selenium)")
from selenium.webdriver.chrome.options import Options  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


@pytest.fixture(scope="module")
def browser():
    options = Options()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def test_page_streams_answer_with_reasoning_panel_and_routing(browser, chat_model, tokenizer):
    app = create_app(Engine(chat_model, tokenizer, max_batch=2), "web-test", Limits(max_tokens_cap=80))
    with LiveServer(app) as server:
        browser.get(server.url + "/")
        WebDriverWait(browser, 20).until(lambda d: d.find_element(By.ID, "model").text == "web-test")
        browser.find_element(By.ID, "temperature").clear()
        browser.find_element(By.ID, "temperature").send_keys("0")
        browser.find_element(By.ID, "input").send_keys("hi")
        browser.find_element(By.ID, "send").click()
        WebDriverWait(browser, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".assistant[data-done=true]"))
        reply = browser.find_element(By.CSS_SELECTOR, ".assistant")
        assert reply.find_element(By.CSS_SELECTOR, ".answer").text == "hello there"
        panel = reply.find_element(By.CSS_SELECTOR, "details.reasoning")
        assert panel.get_attribute("open") is None  # collapsed once the answer is in
        assert "they greet me, so I greet back" in panel.get_attribute("textContent")
        panel.find_element(By.TAG_NAME, "summary").click()
        assert panel.get_attribute("open") is not None
        cells = reply.find_elements(By.CSS_SELECTOR, "details.routing .grid div")
        assert len(cells) > 20  # token column + one MoE layer column per generated token
        assert reply.find_elements(By.CSS_SELECTOR, ".feedback button")
