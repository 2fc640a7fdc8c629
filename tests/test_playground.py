"""The playground page of `moa serve` (GET /): its files over HTTP, and the page itself driven in
a real headless Chromium against a real server on the tiny MoA whose routers tell the synthetic
domains apart (served with an API key, so the page's key field is exercised too)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import httpx
import pytest

from conftest import ROUTED_DOMAINS, ROUTED_PROMPTS, serving
from moa.model import MoAModel
from moa.serve import create_app
from moa.testing import NoBrowser, headless_chromium

KEY = "playground-key"
LAYERS = 2  # of the tiny base
SCREENSHOT_ENV = "MOA_PLAYGROUND_SCREENSHOT"
"""If set, the browser test also saves its screenshot to this path."""


@pytest.fixture(scope="module")
def url(routed_moa_dir) -> str:
    app = create_app(MoAModel.from_pretrained(routed_moa_dir), api_key=KEY, max_new_tokens_limit=32)
    with serving(app) as base_url:
        yield base_url


# --------------------------------------------------------------------------- over HTTP


def test_the_page_and_its_assets_load_without_the_key_but_the_api_does_not(url):
    page = httpx.get(f"{url}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for element_id in ("prompt", "send", "force", "heatmap", "api-key"):
        assert f'id="{element_id}"' in page.text
    assets = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert sorted(assets) == ["/static/app.js", "/static/style.css"]  # nothing from another host: works offline
    for path, kind in zip(sorted(assets), ("text/javascript", "text/css")):
        r = httpx.get(f"{url}{path}")
        assert r.status_code == 200 and r.headers["content-type"].startswith(kind) and r.text.strip()
        assert "http://" not in r.text and "https://" not in r.text
    assert httpx.get(f"{url}/static/missing.js").status_code == 404
    assert httpx.get(f"{url}/v1/models").status_code == 401
    assert httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200


# --------------------------------------------------------------------------- in a browser


def _chromium():
    try:
        return headless_chromium()
    except NoBrowser as e:
        pytest.skip(str(e))


def _send(browser, wait, prompt: str, turns: int) -> None:
    """Type `prompt`, press Send, wait until answer number `turns` has finished streaming."""
    from selenium.webdriver.common.by import By

    box = browser.find_element(By.ID, "prompt")
    box.clear()
    box.send_keys(prompt)
    browser.find_element(By.ID, "send").click()
    wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, ".turn")) == turns
               and b.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "idle")


def _text(browser, element_id: str) -> str:
    from selenium.webdriver.common.by import By

    return browser.find_element(By.ID, element_id).get_property("textContent")


def test_the_playground_shows_the_routers_at_work(url, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    browser = _chromium()
    try:
        wait = WebDriverWait(browser, 60)
        browser.get(url)
        # The server has a key: the page asks for it before it can list the experts.
        wait.until(lambda b: b.find_element(By.ID, "api-key").is_displayed())
        browser.find_element(By.ID, "api-key").send_keys(KEY)
        browser.find_element(By.ID, "key-save").click()
        force = Select(browser.find_element(By.ID, "force"))
        wait.until(lambda b: len(force.options) == 2 + len(ROUTED_DOMAINS))
        assert [o.get_attribute("value") for o in force.options] == ["auto", "base", *ROUTED_DOMAINS]
        max_tokens = browser.find_element(By.ID, "max-tokens")
        max_tokens.clear()
        max_tokens.send_keys("8")
        # Record every change of the Send button's disabled state.
        browser.execute_script("""
            window.sendStates = [];
            const send = document.getElementById('send');
            new MutationObserver(() => window.sendStates.push(send.disabled))
                .observe(send, {attributes: true, attributeFilter: ['disabled']});""")

        # A math prompt: the routers pick the math expert; one heatmap row per layer.
        prompt = ROUTED_PROMPTS["math"][1]
        _send(browser, wait, prompt, turns=1)
        assert _text(browser, "expert") == "math"
        assert browser.execute_script("return window.sendStates") == [True, False]
        want = httpx.post(f"{url}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"}, json={
            "model": "moa", "messages": [{"role": "user", "content": prompt}], "max_tokens": 8, "temperature": 0,
            "top_p": 1}).json()
        assert _text(browser, "answer") == want["choices"][0]["message"]["content"]
        rows = browser.find_elements(By.CSS_SELECTOR, "#heatmap [data-layer]")
        assert [r.get_attribute("data-layer") for r in rows] == [str(i) for i in range(LAYERS)]
        for row in rows:
            probs = [float(c.get_attribute("data-p")) for c in row.find_elements(By.CSS_SELECTOR, ".hm-cell")]
            assert len(probs) == len(ROUTED_DOMAINS) and abs(sum(probs) - 1) < 1e-3
        assert "vote" in browser.find_element(By.CSS_SELECTOR, ".turn .routing").text

        # Forcing another expert changes the badge; the heatmap still shows the routers' view.
        force.select_by_value("json")
        _send(browser, wait, ROUTED_PROMPTS["math"][2], turns=2)
        assert _text(browser, "expert") == "json"
        assert len(browser.find_elements(By.CSS_SELECTOR, "#heatmap [data-layer]")) == LAYERS
        assert "would have chosen math" in _text(browser, "decision")

        # Compare: the routed answer beside the base model's.
        force.select_by_value("base")
        browser.find_element(By.ID, "compare").click()
        _send(browser, wait, ROUTED_PROMPTS["echo"][0], turns=3)
        assert _text(browser, "expert") == "echo" and _text(browser, "expert-compare") == "base"
        assert _text(browser, "answer-compare") != "" and len(browser.find_elements(By.ID, "answer")) == 1

        shot = tmp_path / "playground.png"
        assert browser.save_screenshot(str(shot))
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        if os.environ.get(SCREENSHOT_ENV):
            Path(os.environ[SCREENSHOT_ENV]).write_bytes(shot.read_bytes())
    finally:
        browser.quit()


def test_without_a_browser_the_reason_is_given(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no chromium, no chromedriver
    with pytest.raises(NoBrowser, match="chromium: missing, chromedriver: missing"):
        headless_chromium()


def test_the_playground_marks_an_out_of_domain_answer_as_a_fallback(routed_moa_dir, tmp_path):
    """A routed prompt the checkpoint's fallback sends to the base model: badge 'base (fallback)'."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    from conftest import synthetic_records, write_jsonl
    from moa.data import read_records
    from moa.fallback import calibrate_checkpoint

    train = read_records(write_jsonl(tmp_path / "train.jsonl", synthetic_records(16)))[0]
    valid = read_records(write_jsonl(tmp_path / "valid.jsonl", synthetic_records(12, seed=5)))[0]
    calibrate_checkpoint(routed_moa_dir, train, valid, tmp_path / "moa", progress=False)
    app = create_app(MoAModel.from_pretrained(tmp_path / "moa"), max_new_tokens_limit=32)
    with serving(app) as url:
        browser = _chromium()
        try:
            wait = WebDriverWait(browser, 60)
            browser.get(url)
            force = Select(browser.find_element(By.ID, "force"))
            wait.until(lambda b: len(force.options) == 2 + len(ROUTED_DOMAINS))
            max_tokens = browser.find_element(By.ID, "max-tokens")
            max_tokens.clear()
            max_tokens.send_keys("8")
            _send(browser, wait, "~~~ {{{ ]]] ||| ^^^ ``` ~~~ {{{ ]]] ||| ^^^ ```", turns=1)
            assert _text(browser, "expert") == "base (fallback)"
            assert "out of domain" in browser.find_element(By.CSS_SELECTOR, ".turn .routing").text
        finally:
            browser.quit()
