"""discon_plugins.demo: the generating function on the embedded default, the install hint, and
the Gradio page driven in headless Chromium (skipped where gradio, selenium or a browser is
missing; CI installs them)."""
from __future__ import annotations

import importlib.util
import shutil
import socket
import sys

import pytest
import torch

from discon_core import cli
from discon_plugins.demo import class_choices, generate_pair, load_pipeline, sampling_defaults

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny convs on a shared CPU (conftest)


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline(None, device=torch.device("cpu"), dtype=torch.float32)


def test_discon_and_discrete_images_come_from_the_same_prior_tokens(pipe, monkeypatch):
    seen = []
    forward = pipe.backbone.forward

    def spy(x, mask, labels, cond, **kw):  # the discrete condition each AR step gets
        seen.append(cond.clone())
        return forward(x, mask, labels, cond, **kw)

    monkeypatch.setattr(pipe.backbone, "forward", spy)
    out = generate_pair(pipe, 7, num=3, seed=5, ar_steps=4)
    assert out.discon.shape == out.discrete.shape == (3, 3, 32, 32)
    assert out.tokens.shape == (3, 8, 8) and out.tokens.dtype == torch.int64
    assert 0 <= out.discon.min() and out.discon.max() <= 1 and out.discon.std() > 0.05
    assert len(seen) == 4 and all(torch.equal(c, out.tokens.flatten(1)) for c in seen)
    assert torch.equal(out.discrete, pipe.dtok.decode(out.tokens))
    # the images differ between the two decoders, the tokens do not
    assert (out.discon - out.discrete).abs().mean() > 1e-3


def test_seed_reproduces_and_settings_reach_the_pipeline(pipe):
    a = generate_pair(pipe, 7, num=2, seed=5, ar_steps=4)
    b = generate_pair(pipe, 7, num=2, seed=5, ar_steps=4)
    c = generate_pair(pipe, 7, num=2, seed=6, ar_steps=4)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.discon, b.discon)
    assert not torch.equal(a.tokens, c.tokens)
    hot = generate_pair(pipe, 7, num=2, seed=5, ar_steps=4, prior_temperature=3.0)
    assert not torch.equal(a.tokens, hot.tokens)


def test_choices_and_defaults_come_from_the_presets(pipe):
    assert class_choices(pipe)[7] == ("Sneaker", 7) and len(class_choices(pipe)) == 10
    assert sampling_defaults(pipe) == {"prior_cfg": 4.0, "prior_temperature": 1.0, "ar_steps": 16}


def test_bad_request_is_one_line(pipe):
    from discon_core.errors import DisconError
    with pytest.raises(DisconError, match=r"images per click must be in \[1, 16\]"):
        generate_pair(pipe, 0, num=17)
    with pytest.raises(DisconError, match=r"ar_steps must be in \[1, 64\]"):
        generate_pair(pipe, 0, num=1, ar_steps=0)
    with pytest.raises(DisconError, match=r"seed must be an integer in \[0, 2\*\*63\)"):
        generate_pair(pipe, 0, num=1, seed=2 ** 64)


def test_without_gradio_the_command_names_the_extra(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gradio", None)  # import gradio -> ImportError
    assert cli.main(["demo"]) == 1
    assert capsys.readouterr().err.strip() == ("discon: error: discon demo needs Gradio: "
                                               "pip install 'discon[demo]'")


@pytest.mark.parametrize("args, message", [
    (["--port", "70000"], "--port must be in [1, 65535], got 70000"),
    (["--model", "no/such/folder"], None),
    (["--device", "tpu"], "--device 'tpu'"),
])
def test_bad_arguments_are_one_line_before_serving(args, message, capsys):
    pytest.importorskip("gradio", reason="the install hint comes before argument checks")
    assert cli.main(["demo", *args]) == 1
    err = capsys.readouterr().err
    assert err.startswith("discon: error: ") and err.count("\n") == 1
    assert message is None or message in err


def test_a_taken_port_is_one_line(capsys):
    pytest.importorskip("gradio")
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        assert cli.main(["demo", "--port", str(port), "--device", "cpu", "--dtype", "fp32"]) == 1
    err = capsys.readouterr().err  # Gradio words the reason
    assert err.startswith(f"discon: error: --host 127.0.0.1 --port {port}: cannot serve there (")
    assert err.count("\n") == 1


def _browser() -> tuple[str, str]:
    """(chromium binary, chromedriver), or skip naming what is missing."""
    missing = [m for m in ("gradio", "selenium") if importlib.util.find_spec(m) is None]
    binary = next(filter(None, map(shutil.which, ("chromium", "chromium-browser",
                                                  "google-chrome"))), None)
    driver = shutil.which("chromedriver")
    missing += [] if binary else ["a Chromium browser"]
    missing += [] if driver else ["chromedriver"]
    if missing:
        pytest.skip(f"browser test needs {', '.join(missing)} (apt-get install chromium "
                    "chromium-driver; pip install -e '.[test,demo]')")
    return binary, driver


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::Warning:gradio")  # pandas deprecations inside gradio
def test_page_in_headless_chromium_shows_the_picked_class(pipe, monkeypatch):
    binary, driver_path = _browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    from discon_plugins.demo import build_ui, launch

    asked = []
    generate = pipe.generate
    monkeypatch.setattr(pipe, "generate", lambda labels, **kw: asked.append(labels.tolist())
                        or generate(labels, **kw))
    port = _free_port()
    ui = build_ui(pipe)
    assert launch(ui, host="127.0.0.1", port=port).startswith(f"http://127.0.0.1:{port}")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                 "--window-size=1280,800"):
        options.add_argument(flag)
    browser = webdriver.Chrome(options=options, service=Service(driver_path))
    try:
        browser.get(f"http://127.0.0.1:{port}/")
        wait = WebDriverWait(browser, 20)
        wait.until(ec.element_to_be_clickable((By.CSS_SELECTOR, "#class input"))).click()
        wait.until(ec.element_to_be_clickable(
            (By.CSS_SELECTOR, '#class li[aria-label="Sneaker"]'))).click()
        browser.find_element(By.CSS_SELECTOR, "#generate").click()
        for panel in ("#discon-image img", "#discrete-image img"):
            img = wait.until(ec.visibility_of_element_located((By.CSS_SELECTOR, panel)))
            wait.until(lambda _: int(img.get_attribute("naturalWidth") or 0) > 0)
            # 8 images of 32 px, four a row with 2 px gaps, enlarged 3x: (4 * 34 + 2) * 3
            assert int(img.get_attribute("naturalWidth")) == 414
    finally:
        browser.quit()
        ui.close()
    assert asked == [[7] * 8]
