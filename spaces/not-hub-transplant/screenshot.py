"""Take the README screenshot: start the Space on its real defaults, transplant and sweep in headless Chromium.

python spaces/not-hub-transplant/screenshot.py      # writes screenshot.png (desktop) and screenshot-phone.png
"""

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from playwright.sync_api import sync_playwright

HERE = Path(__file__).parent
PORT = 7861
ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def main() -> None:
    env = {**os.environ, "GRADIO_SERVER_PORT": str(PORT), "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
    t0 = time.time()
    app = subprocess.Popen([sys.executable, str(HERE / "app.py")], env=env)
    try:
        while True:
            try:
                socket.create_connection(("127.0.0.1", PORT), timeout=1).close()
                break
            except OSError:
                time.sleep(0.5)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=ARGS)
            phone = browser.new_page(viewport={"width": 390, "height": 844})
            phone.goto(f"http://127.0.0.1:{PORT}/")
            phone.wait_for_function(
                "document.querySelector('#status')?.innerText.includes('ompatible')", timeout=180_000
            )
            print(f"first page usable after {time.time() - t0:.0f}s")
            phone.screenshot(path=str(HERE / "screenshot-phone.png"))  # the first screen of a phone
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(f"http://127.0.0.1:{PORT}/")
            page.wait_for_function(
                "document.querySelector('#status')?.innerText.includes('ompatible')", timeout=180_000
            )
            page.click("#transplant")
            page.wait_for_function(
                "document.querySelector('#run-status').innerText.includes('Transplanted')", timeout=180_000
            )
            time.sleep(8)  # let both generations stream
            page.click("#sweep")
            page.wait_for_function(
                "document.querySelector('#sweep-summary').innerText.includes('Best: position')", timeout=300_000
            )
            page.screenshot(path=str(HERE / "screenshot.png"), full_page=True)
            browser.close()
    finally:
        app.terminate()
        app.wait(timeout=30)
    print(f"wrote {HERE / 'screenshot.png'}")


if __name__ == "__main__":
    main()
