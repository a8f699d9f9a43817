"""The web page of the Serve application (GET /) in a real browser: headless Chromium from Debian's `chromium`,
driven by Selenium through Debian's `chromium-driver` (offline: no Selenium Manager), against the application
mounted under a prefix on the shared local Ray cluster. `make test` installs the two packages with apt-get."""
from __future__ import annotations

import base64
import io
import os
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from pfsr.config import ServeConfig
from pfsr.degradation import to_uint8, upsample
from pfsr.pipeline.serve import build_app
from pfsr.sampling import SAMPLERS
from tests.multinode import free_port

pytestmark = pytest.mark.ray

CHROMEDRIVER, CHROMIUM = Path("/usr/bin/chromedriver"), Path("/usr/bin/chromium")
TOKEN = "page-token-41c2"
PREFIX = "/mounted/pfsr"  # the page must find /upscale next to itself, wherever the application is mounted
SERVE = dict(max_batch_size=1, max_pixels=48 * 48, tile=32, tile_overlap=8, size_bucket=8, max_nfe=40,
             token_env="PFSR_PAGE_TOKEN", min_replicas=1, max_replicas=1)
SCREENSHOT_DIR = os.environ.get("PFSR_SCREENSHOT_DIR")  # keep the screenshot (for looking at it)


@pytest.fixture(scope="module")
def browser():
    if not (CHROMEDRIVER.is_file() and CHROMIUM.is_file()):
        pytest.skip("no /usr/bin/chromedriver: needs Debian's chromium and chromium-driver "
                    "(`apt-get install -y chromium chromium-driver`, which `make test` runs as root)")
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    os.environ["SE_OFFLINE"] = "true"  # never let Selenium Manager download a driver or a browser
    options = Options()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1100,1300", "--force-device-scale-factor=1"):
        options.add_argument(flag)  # --no-sandbox: Chromium's sandbox refuses to run as root
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    driver.set_script_timeout(60)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def page_url(ray_cluster, tiny_checkpoint):
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    token_env = {"runtime_env": {"env_vars": {"PFSR_PAGE_TOKEN": TOKEN}}}
    serve.run(build_app(str(tiny_checkpoint), ServeConfig(**SERVE), ray_actor_options=token_env),
              name="pfsr-page", route_prefix=PREFIX)
    yield f"http://127.0.0.1:{port}{PREFIX}/"
    serve.shutdown()


@pytest.fixture(scope="module")
def lr_file(photos, tmp_path_factory) -> Path:
    """A 20x16 LR crop of coffee (with edges and texture) as PNG."""
    path = tmp_path_factory.mktemp("page") / "coffee_lr.png"
    Image.fromarray(np.ascontiguousarray(photos["coffee"][150:166, 250:270])).save(path)
    return path


def _decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def _blob(driver, url: str) -> bytes:
    """The bytes behind a blob: URL of the page."""
    b64 = driver.execute_async_script("""
        const done = arguments[arguments.length - 1];
        fetch(arguments[0]).then(r => r.arrayBuffer()).then(buf => {
          let s = ""; new Uint8Array(buf).forEach(b => s += String.fromCharCode(b)); done(btoa(s));
        });""", url)
    return base64.b64decode(b64)


def _submit(driver, page_url: str, lr_file: Path, *, sampler: str, steps: str, token: str) -> str:
    """Fill the form, upload, wait for the answer; the message shown."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    driver.get(page_url)
    driver.find_element(By.ID, "file").send_keys(str(lr_file))
    Select(driver.find_element(By.ID, "sampler")).select_by_value(sampler)
    for field, value in (("steps", steps), ("token", token)):
        element = driver.find_element(By.ID, field)
        element.clear()
        element.send_keys(value)
    driver.find_element(By.ID, "go").click()
    WebDriverWait(driver, 120).until(
        lambda d: d.find_element(By.ID, "message").text.startswith(("Done", "Error", "Request failed")))
    return driver.find_element(By.ID, "message").text


def test_page_is_public_and_offers_the_samplers(page_url):
    r = httpx.get(page_url, timeout=30)  # no token
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    for name in SAMPLERS:
        assert f'<option value="{name}"' in r.text
    assert '<option value="dpmpp_2m" selected>' in r.text and "(10 for the default sampler;" in r.text
    assert "__" not in r.text.split("<script>")[0]  # every placeholder filled


def test_upload_in_the_browser_matches_the_api(browser, page_url, lr_file, tmp_path):
    from selenium.webdriver.common.by import By

    # the page addressed without its trailing slash still finds /upscale under the prefix
    message = _submit(browser, page_url.rstrip("/"), lr_file, sampler="dpmpp_2m", steps="3", token=TOKEN)
    assert message == "Done.", message
    sr_src = browser.find_element(By.ID, "sr").get_attribute("src")
    shown = _blob(browser, sr_src)
    lr = _decode(lr_file.read_bytes())
    sr = _decode(shown)
    assert sr.shape == (lr.shape[0] * 4, lr.shape[1] * 4, 3)

    # the API's own answer to the same request, byte for byte
    api = httpx.post(page_url + "upscale", params={"sampler": "dpmpp_2m", "steps": "3", "seed": "0"},
                     content=lr_file.read_bytes(), timeout=120,
                     headers={"Content-Type": "image/png", "Authorization": f"Bearer {TOKEN}"})
    assert api.status_code == 200 and api.content == shown
    assert "3 network evaluations" in browser.find_element(By.ID, "info").text

    # bicubic beside it: the page's own (JavaScript) bicubic equals pfsr.degradation.upsample to 1/255
    canvas = browser.execute_script("return document.getElementById('bicubic').toDataURL('image/png')")
    bicubic = _decode(base64.b64decode(canvas.split(",", 1)[1])).astype(int)
    expected = to_uint8(upsample(torch.from_numpy(lr).permute(2, 0, 1)[None].float() / 255, 4))[0]
    diff = np.abs(bicubic - expected.permute(1, 2, 0).numpy().astype(int))
    assert diff.max() <= 1 and diff.mean() < 0.05, (diff.max(), diff.mean())

    # the download link holds the result under the upload's name
    link = browser.find_element(By.ID, "download")
    assert link.get_attribute("download") == "coffee_lr_x4.png" and link.get_attribute("href") == sr_src

    # the slider moves the boundary between the result and bicubic
    browser.execute_script("const s = document.getElementById('slider'); s.value = 80;"
                           "s.dispatchEvent(new Event('input'));")
    assert browser.find_element(By.ID, "sr").value_of_css_property("clip-path") == "inset(0px 20% 0px 0px)"
    shot = Path(SCREENSHOT_DIR or tmp_path) / "web_page.png"
    assert browser.save_screenshot(str(shot)) and _decode(shot.read_bytes()).shape[0] > 100


def test_the_api_errors_are_shown(browser, page_url, lr_file):
    from selenium.webdriver.common.by import By

    message = _submit(browser, page_url, lr_file, sampler="dpmpp_2m", steps="3", token="")
    assert message == "Error 401: missing or wrong bearer token (Authorization: Bearer <token>)"
    assert "error" in browser.find_element(By.ID, "message").get_attribute("class")
    assert "hidden" in browser.find_element(By.ID, "result").get_attribute("class")
    message = _submit(browser, page_url, lr_file, sampler="dpmpp_2m", steps="41", token=TOKEN)
    assert message == "Error 400: steps=41 is out of range [1, 40]"
