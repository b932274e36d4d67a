"""The chat demo in a real browser: ``examples/chat_demo.py`` as a subprocess, headless Chromium through Selenium.

Uses the system's ``chromium`` and ``chromedriver`` (Debian: ``apt-get install chromium chromium-driver``;
Selenium Manager is never asked to download one) and skips, saying what is missing, without them.
Two turns with images give the model's own greedy answers; a text file uploaded as an image shows
the server's message in the page.

The README's screenshot (``examples/chat_demo.png``) is this test run on the trained shapes model::

    CHAT_DEMO_CHECKPOINT=out/flamingo_shapes.safetensors CHAT_DEMO_SCREENSHOT=examples/chat_demo.png \\
        pytest tests/test_chat_browser.py
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("PIL")
pytest.importorskip("safetensors")
webdriver = pytest.importorskip("selenium.webdriver", reason="the browser test needs selenium: pip install selenium")

from PIL import Image  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402
from test_chat_demo import tiny_shapes_checkpoint  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

from shapes_dataset import make_labelled_images, make_tokenizer  # noqa: E402
from train_shapes import load_checkpoint  # noqa: E402

pytestmark = pytest.mark.browser
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
PAGE_MAX_NEW_TOKENS = 16  # the page's default
QUESTIONS = ("what color ?", "what shape ?")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    given = os.environ.get("CHAT_DEMO_CHECKPOINT")
    if given:
        return Path(given)
    return tiny_shapes_checkpoint(tmp_path_factory.mktemp("browser") / "shapes.safetensors")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def demo_url(checkpoint):
    port = free_port()
    command = [sys.executable, str(ROOT / "examples" / "chat_demo.py"), "--checkpoint", str(checkpoint)]
    server = subprocess.Popen(
        [*command, "--port", str(port), "--device", "cpu"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 120
        while True:
            if server.poll() is not None:
                pytest.fail(f"chat_demo.py exited with {server.returncode}:\n{server.stdout.read()}")
            try:
                with urllib.request.urlopen(url, timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail("chat_demo.py did not serve within 120 s")
                time.sleep(0.2)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.fixture(scope="module")
def browser():
    missing = [name for name, path in (("chromium", CHROMIUM), ("chromedriver", CHROMEDRIVER)) if path is None]
    if missing:
        pytest.skip(f"no {' or '.join(missing)} on PATH (Debian: apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=800,640"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def write_images(folder: Path) -> list[Path]:
    pixels, _ = make_labelled_images(len(QUESTIONS), torch.Generator().manual_seed(7))
    paths = []
    for i, image in enumerate(pixels):
        paths.append(folder / f"shape{i}.png")
        Image.fromarray((image.permute(1, 2, 0) * 255).round().byte().numpy()).save(paths[-1])
    return paths


def expected_answers(checkpoint: Path, paths: list[Path]) -> list[str]:
    """The model's own greedy replies to the two turns, decoded as the page shows them."""
    model, _, _ = load_checkpoint(checkpoint, torch.device("cpu"))
    tokenizer = make_tokenizer()
    eos, state, answers = tokenizer.ids["."], None, []
    for path, question in zip(paths, QUESTIONS):
        pixels = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1).float() / 255
        text, images = torch.tensor([tokenizer.encode(f"<image> {question}")]), pixels[None, None]  # (1, 1, 3, H, W)
        state = model.prefill(text, images) if state is None else model.extend(state, text, images)
        new = model.generate_from(state, max_new_tokens=PAGE_MAX_NEW_TOKENS, temperature=0, eos_token_id=eos)
        tokens = new[0].tolist()
        answers.append(tokenizer.decode(tokens[: tokens.index(eos) + 1] if eos in tokens else tokens))
    return answers


def ask(driver, wait: WebDriverWait, upload: Path, question: str) -> None:
    """Attach ``upload``, type ``question`` after it, send."""
    chips = len(driver.find_elements(By.CSS_SELECTOR, "#pending .chip"))
    driver.find_element(By.ID, "file").send_keys(str(upload))
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#pending .chip")) > chips)
    driver.find_element(By.ID, "text").send_keys(question)
    driver.find_element(By.ID, "send").click()


def test_two_turns_and_a_bad_upload_in_the_browser(browser, demo_url, checkpoint, tmp_path):
    paths = write_images(tmp_path)
    expected = expected_answers(checkpoint, paths)
    wait = WebDriverWait(browser, 60)
    browser.get(demo_url)
    for turn, (path, question) in enumerate(zip(paths, QUESTIONS), start=1):
        ask(browser, wait, path, question)
        wait.until(lambda d, n=turn: len(d.find_elements(By.CSS_SELECTOR, ".assistant[data-done]")) == n)
    replies = [element.text for element in browser.find_elements(By.CSS_SELECTOR, ".assistant")]
    assert replies == expected
    users = browser.find_elements(By.CSS_SELECTOR, ".user")
    assert [element.text.strip() for element in users] == list(QUESTIONS)
    assert all(len(element.find_elements(By.TAG_NAME, "img")) == 1 for element in users)
    assert browser.find_element(By.ID, "error").text == ""
    screenshot = os.environ.get("CHAT_DEMO_SCREENSHOT")
    if screenshot:
        browser.save_screenshot(screenshot)

    not_an_image = tmp_path / "notes.txt"
    not_an_image.write_text("this is not a picture")
    ask(browser, wait, not_an_image, "what color ?")
    wait.until(lambda d: d.find_element(By.ID, "error").text)
    error = browser.find_element(By.ID, "error").text
    assert error == "image 1 is not an image that can be read (PNG, JPEG, GIF, WebP, ...)"
    assert len(browser.find_elements(By.CSS_SELECTOR, ".assistant")) == 2  # the refused turn left no trace
    assert browser.save_screenshot(str(tmp_path / "chat_demo.png"))


def test_text_placed_before_an_image_stays_before_it(browser, demo_url, tmp_path):
    """ "Add text" then an image: the message is sent, and shown, in that order; Clear empties the page."""
    (path,) = write_images(tmp_path)[:1]
    wait = WebDriverWait(browser, 60)
    browser.get(demo_url)
    browser.find_element(By.ID, "text").send_keys("what color ?")
    browser.find_element(By.ID, "pin").click()
    ask(browser, wait, path, "")
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".assistant[data-done]"))
    order = browser.execute_script(
        "return Array.from(document.querySelector('.user').childNodes, n => n.nodeName === 'IMG' ? 'image' : 'text')"
    )
    assert order == ["text", "image"]
    assert browser.find_element(By.ID, "error").text == ""
    browser.find_element(By.ID, "clear").click()
    wait.until(lambda d: not d.find_elements(By.CSS_SELECTOR, "#transcript .message"))
