"""The control plane's pages in a real headless Chromium (Debian's `chromium` and `chromium-driver`, driven by
selenium): the run list shows runs as they appear, a run page draws its curves, and a co-learning run's policy is
switched and the run stopped from the page, with the API token asked once and kept for the browser session."""
import shutil
import time
from pathlib import Path

import pytest

from tests.helpers import wait_for
from tests.test_services import Server, make_workspace, run_body

TOKEN = "browser-t0k3n-0123456789abcdef"
CHROMIUM, DRIVER = shutil.which("chromium") or "/usr/bin/chromium", shutil.which("chromedriver") or \
    "/usr/bin/chromedriver"


@pytest.fixture
def browser():
    if not (Path(CHROMIUM).exists() and Path(DRIVER).exists()):
        pytest.skip("Chromium is not installed (Debian: apt-get install chromium chromium-driver; .ci/run does)")
    from selenium import webdriver

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,900"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(options=opts, service=webdriver.ChromeService(executable_path=DRIVER))
    try:
        yield driver
    finally:
        driver.quit()


def _text(driver, css: str) -> str:
    """The rendered text of the first element matching `css` ("" when none), read in one script call: the pages
    re-render their rows every poll, so an element handle found first and read later can already be gone."""
    return driver.execute_script(
        "const e = document.querySelector(arguments[0]); return e ? e.innerText : '';", css)


def _points(driver, chart: str) -> int:
    """How many points the chart's first line has (0 when it has none yet)."""
    return driver.execute_script(
        "const l = document.querySelector(arguments[0] + ' polyline');"
        "return l ? l.getAttribute('points').trim().split(' ').length : 0;", chart)


def test_pages_list_runs_draw_curves_and_steer_a_colad_run(tmp_path, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    server = Server(make_workspace(tmp_path), "--max-concurrent", "2", step_s=0.1, env={"LAD_API_TOKEN": TOKEN})
    auth = {"Authorization": f"Bearer {TOKEN}"}
    try:
        browser.get(server.url + "/")
        plain = server.post(run_body("plain-ui", steps=12), headers=auth).json()
        colad = server.post(run_body("colad-ui", steps=3000, mode="colad"), headers=auth).json()
        wait_for(lambda: len(browser.find_elements(By.CSS_SELECTOR, "#runs tbody tr[data-run]")) == 2, 20,
                 "both runs listed on /")
        server.wait_state(plain["id"], "succeeded", timeout=30)
        wait_for(lambda: _text(browser, f'tr[data-run="{plain["id"]}"] .state') == "succeeded", 10, "the plain run's state on /")
        row = _text(browser, f'tr[data-run="{plain["id"]}"]')
        assert "12 / 12" in row and "0.500" in row  # progress and the latest AP

        browser.find_element(By.LINK_TEXT, "plain-ui").click()
        wait_for(lambda: _points(browser, "#chart-loss") == 12 and _points(browser, "#chart-ap") == 1, 20,
                 "the loss and AP curves")
        assert _points(browser, "#chart-lr") == 12
        assert "last.pt" in _text(browser, "#checkpoints")
        assert browser.find_element(By.ID, "stop").get_attribute("disabled")  # a finished run cannot be stopped

        browser.get(f"{server.url}/ui/runs/{colad['id']}")
        wait_for(lambda: browser.find_element(By.ID, "roles").is_displayed()
                 and _points(browser, "#chart-ratio") > 1, 20, "the co-learning controls and teacher ratio")
        assert _text(browser, "#policy-now") == "auto"
        Select(browser.find_element(By.ID, "policy-kind")).select_by_value("pin-a")
        browser.find_element(By.ID, "policy-apply").click()
        wait_for(lambda: browser.find_element(By.ID, "token-box").is_displayed(), 10, "the token prompt")
        browser.find_element(By.ID, "token-input").send_keys(TOKEN)
        browser.find_element(By.ID, "token-save").click()
        wait_for(lambda: _text(browser, "#policy-result") == "requested pin-a", 10,
                 "the policy request")
        assert server.client.get(f"/runs/{colad['id']}/roles").json()["requested"]["policy"] == "pin-a"
        wait_for(lambda: _text(browser, "#policy-now") == "pin-a", 20, "the trainer to apply it")
        assert TOKEN not in browser.current_url
        assert browser.execute_script("return sessionStorage.getItem('lad-api-token')") == TOKEN

        browser.find_element(By.ID, "stop").click()  # the token is kept: no second prompt
        server.wait_state(colad["id"], "stopped", timeout=30)
        time.sleep(0.5)
        assert not browser.find_element(By.ID, "token-box").is_displayed()
    finally:
        for run in server.client.get("/runs").json()["runs"]:
            if run["state"] in ("pending", "running"):
                server.client.post(f"/runs/{run['id']}/stop", headers=auth)
        server.stop()
