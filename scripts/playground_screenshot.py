"""Screenshot of the `moa serve` playground on a real checkpoint (how docs/playground.png was made).

    python scripts/playground_screenshot.py --moa runs/demo/moa --out docs/playground.png

Serves the checkpoint on a loopback port, opens the page in headless Chromium, asks the first
test prompt of each --ask domain (the routers choose the expert; each prompt on its own, not
as one conversation), then the first of --compare with the routed answer beside the base
model's, and saves the page as PNG. Needs chromium and
chromium-driver (apt) and selenium (the dev extra).
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def first_prompts(path: Path) -> dict[str, str]:
    """The first prompt of every domain in a JSONL file of records."""
    out: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            r = json.loads(line)
            out.setdefault(r["domain"], r.get("prompt") or r["messages"][0]["content"])
    return out


def serve_in_thread(app):
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return server, f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"


def ask(browser, prompt: str, turns: int, timeout: float) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    box = browser.find_element(By.ID, "prompt")
    browser.execute_script("arguments[0].value = arguments[1]", box, prompt)  # keeps newlines (Enter would send)
    browser.find_element(By.ID, "send").click()
    WebDriverWait(browser, timeout).until(
        lambda b: len(b.find_elements(By.CSS_SELECTOR, ".turn")) == turns
        and b.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "idle")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--moa", required=True, help="MoA checkpoint directory")
    ap.add_argument("--out", default=str(ROOT / "docs" / "playground.png"), help="PNG to write")
    ap.add_argument("--data", default=str(ROOT / "data" / "demo" / "test.jsonl"), help="records to take prompts from")
    ap.add_argument("--ask", nargs="*", default=["arithmetic", "json"], help="domains asked with routing")
    ap.add_argument("--compare", default="prose", help="domain asked last, routed answer beside the base model's")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--size", default="1400x1050", help="window WIDTHxHEIGHT")
    args = ap.parse_args()

    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    from moa.model import MoAModel
    from moa.serve import create_app
    from moa.testing import headless_chromium

    prompts = first_prompts(Path(args.data))
    missing = [d for d in [*args.ask, args.compare] if d not in prompts]
    if missing:
        print(f"no prompt of domain(s) {', '.join(missing)} in {args.data}", file=sys.stderr)
        return 2
    server, url = serve_in_thread(create_app(MoAModel.from_pretrained(args.moa)))
    width, height = map(int, args.size.split("x"))
    browser = headless_chromium(width, height)
    try:
        browser.get(url)
        Select(browser.find_element(By.ID, "force"))  # the page is there
        tokens = browser.find_element(By.ID, "max-tokens")
        tokens.clear()
        tokens.send_keys(str(args.max_tokens))
        browser.find_element(By.ID, "history").click()  # route each prompt on its own
        turns = 0
        for domain in args.ask:
            turns += 1
            ask(browser, prompts[domain], turns, timeout=600)
        Select(browser.find_element(By.ID, "force")).select_by_value("base")
        browser.find_element(By.ID, "compare").click()
        ask(browser, prompts[args.compare], turns + 1, timeout=600)
        experts = [e.get_property("textContent") for e in browser.find_elements(By.CSS_SELECTOR, ".badge")]
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(args.out)
        print(f"{args.out}: answers by {', '.join(experts)}")
    finally:
        browser.quit()
        server.should_exit = True
    return 0


if __name__ == "__main__":
    sys.exit(main())
