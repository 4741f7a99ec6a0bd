"""The dashboard in a real headless Chromium (Debian's ``chromium``, driven by playwright), served by the head
of a running ``hexgen demo --keep``: the demo's asymmetric pipeline (TP 3 with 20 layers, TP 1 with 10) on a
tiny random model of SmolLM2's shape, so that it forms quickly on CPU. Skips only without chromium."""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading

import pytest

from tests.serving_harness import REPO
from tests.waiting import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# what works as root on a machine with no network but loopback: no sandbox, no GPU, no background traffic
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
URL_LINE = re.compile(r"dashboard: (http://\S+)")


def smollm2_shaped_model(path: str) -> str:
    """A random Llama with SmolLM2's layer count and heads (30 layers, 9 query / 3 KV heads), tiny widths."""
    from tests.models import llama_config, save_llama
    from tests.tiny_tokenizer import build_tiny_tokenizer

    cfg = llama_config(num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, hidden_size=72,
                       intermediate_size=96)
    return save_llama(path, cfg, tokenizer=build_tiny_tokenizer())


@pytest.fixture
def demo(tmp_path):
    """A running ``hexgen demo --keep`` on the tiny model; yields the dashboard URL it printed."""
    if not os.path.exists(CHROMIUM):
        pytest.skip("chromium is not installed (Debian: apt-get install chromium; .ci/run installs it)")
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    pytest.importorskip("playwright.sync_api")
    model = smollm2_shaped_model(str(tmp_path / "model"))
    proc = subprocess.Popen([sys.executable, "-m", "hexgen.cli", "demo", "--model", model, "--keep",
                             "--question", "Hello", "--max-new-tokens", "4", "--log-dir", str(tmp_path / "logs")],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        def up() -> str | None:
            if proc.poll() is not None:
                raise AssertionError("the demo exited:\n" + "".join(lines)[-6000:])
            text = "".join(lines)
            found = URL_LINE.search(text)
            return found.group(1) if found and "serving until Ctrl-C" in text else None

        url = wait_until(up, 300, interval=0.2, what="the demo up with its dashboard URL printed")
        yield url
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # the demo drains and stops everything it started
            try:
                proc.wait(120)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        reader.join(5)
        proc.stdout.close()
    assert proc.returncode in (0, 130), "".join(lines)[-4000:]


def test_dashboard_draws_the_demo_pipeline_and_streams_a_chat_answer(demo, tmp_path):
    from playwright.sync_api import sync_playwright

    errors: list[str] = []
    shot = tmp_path / "artifacts" / "dashboard.png"
    shot.parent.mkdir()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.on("console", lambda m: errors.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
            page.goto(demo)
            stage0, stage1 = page.locator('.stage[data-stage="0"]'), page.locator('.stage[data-stage="1"]')
            stage1.wait_for(timeout=30_000)
            assert "TP 3" in stage0.inner_text() and "20 layers (0–19)" in stage0.inner_text()
            assert "TP 1" in stage1.inner_text() and "10 layers (20–29)" in stage1.inner_text()
            assert stage0.locator(".ranks li").count() == 3 and stage1.locator(".ranks li").count() == 1
            # the stage leaders' figures arrive through Redis within a heartbeat interval or two
            page.wait_for_function("() => [...document.querySelectorAll('.stage .kv')]"
                                   ".every(e => /KV \\d+ \\/ \\d+ blocks/.test(e.textContent))", timeout=30_000)

            page.evaluate("""() => {
                window.__deltas = 0;
                new MutationObserver(ms => { for (const m of ms) {
                    const msg = m.target.closest ? m.target.closest('.msg.assistant') : null;
                    if (msg && m.type === 'childList' && msg.textContent) window.__deltas += 1; } })
                  .observe(document.getElementById('transcript'), {childList: true, subtree: true});
            }""")
            page.fill("#max-tokens", "16")
            page.fill("#chat-input", "What is the capital of France?")
            page.click("#send")
            answer = page.locator(".msg.assistant.done")
            answer.wait_for(timeout=90_000)
            assert answer.inner_text().strip(), "the answer is empty"
            assert page.evaluate("window.__deltas") >= 2, "the answer arrived in one piece, not streamed"
            assert page.locator(".msg.error").count() == 0
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    print(f"dashboard screenshot: {shot}")
    assert errors == []
