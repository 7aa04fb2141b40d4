"""The web page in a real browser: Debian's headless Chromium driven by selenium (chromedriver),
with Chromium's fake camera feeding the realtime tab. Skipped where Chromium is not installed
(.ci/run installs it)."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

selenium = pytest.importorskip("selenium")
from selenium import webdriver  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
    pytest.skip("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)",
                allow_module_level=True)


def chromium(width: int = 1100, height: int = 720):
    """Headless Chromium with a fresh profile and the fake camera (its test pattern)."""
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="chromium-")
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream",
                 f"--user-data-dir={profile}", f"--window-size={width},{height}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(60)
    return driver, profile


@pytest.fixture(scope="module")
def browser():
    driver, profile = chromium()
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def test_generate_tab(browser, digits_server):
    browser.get(digits_server.url + "/")
    prompt = browser.find_element(By.ID, "prompt")
    prompt.clear()
    prompt.send_keys("7")
    browser.find_element(By.ID, "generate").click()
    wait = WebDriverWait(browser, 60)
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#images img")) == 4)
    loaded = browser.execute_script(
        "return [...document.querySelectorAll('#images img')].map(i => i.complete && i.naturalWidth)")
    assert loaded == [16, 16, 16, 16]
    assert "image(s) in" in browser.find_element(By.ID, "status").text
    # a bad prompt shows the server's error, the page goes on
    prompt.clear()
    prompt.send_keys("cat")
    browser.find_element(By.ID, "generate").click()
    wait.until(lambda d: "one digit" in d.find_element(By.ID, "status").text)


def test_realtime_tab_with_the_fake_camera(browser, digits_server):
    browser.get(digits_server.url + "/")
    browser.find_element(By.ID, "tab-realtime").click()
    browser.find_element(By.ID, "rt-prompt").send_keys("3")
    browser.find_element(By.ID, "rt-start").click()
    # the page counts a frame when it has decoded it, so with 5 counted the picture is a frame
    WebDriverWait(browser, 60).until(
        lambda d: int(d.find_element(By.ID, "rt-output").get_attribute("data-frames") or 0) >= 5)
    size = browser.execute_script("const i = document.getElementById('rt-output'); return [i.naturalWidth, "
                                  "i.naturalHeight, document.getElementById('camera').videoWidth]")
    assert size == [16, 16, 640]
    assert "frames" in browser.find_element(By.ID, "rt-status").text
    browser.find_element(By.ID, "rt-stop").click()
