"""`quantkit serve` in a real browser: the real command serving the session's sample build and an SQLite queue with a
done, a failed and a running job, driven through Debian's headless Chromium by selenium (scripts/setup.sh installs
chromium and chromium-driver; nothing is downloaded at test time). Each page is saved as a screenshot under
test-output/dashboard/ for a person to look at."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, run_cli
from quantkit.dashboard.public import public_text
from quantkit.jobs.queue import open_queue

SCREENSHOTS = REPO / "test-output" / "dashboard"
EVIL = "<script>window.__pwned = 1</script><img src=x onerror=\"window.__pwned = 2\">"
WAIT_S = 20
FAKE_TOKEN = "hf_" + "x" * 34  # shaped like a Hub token, made here so that no token-like string is in the source


def _chromium() -> tuple[str, str]:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (browser and driver):
        raise RuntimeError("no headless Chromium (chromium, chromedriver): run ./scripts/setup.sh, which installs "
                           "Debian's chromium and chromium-driver")
    return browser, driver


@pytest.fixture(scope="module")
def site(sample_build, tmp_path_factory):
    """The builds folder (the sample's report, and a copy whose model name and smoke reply carry HTML), a queue,
    and `quantkit serve` on a free port."""
    tmp = tmp_path_factory.mktemp("dashboard")
    builds = tmp / "builds"
    sample = builds / sample_build["dir"].name
    sample.mkdir(parents=True)
    shutil.copy2(sample_build["dir"] / "report.json", sample / "report.json")
    evil = json.loads((sample / "report.json").read_text())
    evil["model"] = f"Evil {EVIL}"
    evil["artifacts"][0]["evaluation"]["smoke_reply"] = f"{EVIL} and a local path /root/secret/folder/x.gguf"
    (builds / "Evil").mkdir()
    (builds / "Evil" / "report.json").write_text(json.dumps(evil))

    q = open_queue(tmp / "queue" / "queue.db")
    done = q.enqueue(f"alice/{sample.name}", "a" * 40, "fast", builds)
    failed = q.enqueue("alice/Broken-7B", "b" * 40, "default", builds)
    running = q.enqueue("alice/Mixtral-8x7B-Instruct", "c" * 40, "default", builds)
    for _ in range(3):
        q.claim("node-1:4242", 3600)
    q.finish(done.id, "node-1:4242", 0)
    q.finish(failed.id, "node-1:4242", 3, f"cannot read {tmp}/hub/Broken-7B/config.json: the repo has no config.json",
             fix="check that alice/Broken-7B is a transformers checkpoint")
    q.log_path(running.id).parent.mkdir(parents=True, exist_ok=True)
    q.log_path(running.id).write_text("=== attempt 1/3 on node-1:4242\nbuilding Mixtral-8x7B-Instruct-Q4_K_M.gguf 41%\n")

    proc = subprocess.Popen([sys.executable, "-m", "quantkit", "serve", "--queue", str(q.path), "--builds", str(builds),
                             "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    line = proc.stdout.readline()
    if "http://" not in line:
        proc.kill()
        raise AssertionError(f"quantkit serve did not start: {line}{proc.stderr.read()}")
    url = line.split("at ", 1)[1].split()[0].rstrip("/")
    yield {"url": url, "queue": q, "jobs": (done, failed, running), "sample": sample.name, "tmp": tmp,
           "report": json.loads((sample / "report.json").read_text())}
    proc.terminate()
    proc.wait(10)


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver = _chromium()
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1100",
                "--disable-gpu", "--no-first-run", "--disable-extensions"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    os.environ["SE_OFFLINE"] = "true"  # selenium must not look for a browser or driver to download
    chrome = webdriver.Chrome(service=Service(driver), options=options)
    yield chrome
    chrome.quit()


def _open(browser, url: str, ready: str):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get_log("browser")  # what earlier pages logged
    browser.get(url)
    WebDriverWait(browser, WAIT_S).until(EC.presence_of_element_located((By.CSS_SELECTOR, ready)))


def _console_errors(browser) -> list[str]:
    return [e["message"] for e in browser.get_log("browser") if e["level"] == "SEVERE"]


def _screenshot(browser, name: str) -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / name
    browser.set_window_size(1400, max(900, browser.execute_script("return document.body.scrollHeight") + 40))
    assert browser.save_screenshot(str(path)), f"no screenshot {path}"
    assert path.stat().st_size > 10_000
    print(f"screenshot: {path}")
    return path


def test_jobs_page_shows_each_state_and_refreshes_without_a_reload(site, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    done, failed, running = site["jobs"]
    _open(browser, site["url"] + "/", f"#job-{running.id}")
    assert _console_errors(browser) == []
    row = {j.id: browser.find_element(By.ID, f"job-{j.id}") for j in site["jobs"]}
    assert row[done.id].get_attribute("data-state") == "done"
    link = row[done.id].find_element(By.TAG_NAME, "a")
    assert link.text == done.repo_id and link.get_attribute("href") == f"{site['url']}/builds/{site['sample']}"
    # The failed job: its error line and its fix, the local path in it cut to the file's name.
    assert row[failed.id].get_attribute("data-state") == "failed"
    error = row[failed.id].find_element(By.CSS_SELECTOR, ".error").text
    assert error == "cannot read …/config.json: the repo has no config.json"
    assert row[failed.id].find_element(By.CSS_SELECTOR, ".fix").text == \
        "fix: check that alice/Broken-7B is a transformers checkpoint"
    # The running job: where, and its progress (its log's last line).
    assert row[running.id].find_element(By.CSS_SELECTOR, ".progress").text == \
        "building Mixtral-8x7B-Instruct-Q4_K_M.gguf 41%"
    assert "on node-1:4242" in row[running.id].text
    assert browser.find_element(By.ID, "counts").text == "1 done · 1 failed · 1 running"
    _screenshot(browser, "jobs.png")
    assert str(site["tmp"]) not in browser.page_source

    # Live: the running job ends; the page shows it within a refresh or two, without loading again.
    browser.execute_script("window.__samePage = true")
    site["queue"].finish(running.id, "node-1:4242", 0)
    WebDriverWait(browser, WAIT_S).until(
        lambda b: b.find_element(By.ID, f"job-{running.id}").get_attribute("data-state") == "done")
    assert browser.execute_script("return window.__samePage") is True
    assert browser.find_element(By.ID, "counts").text == "2 done · 1 failed"
    assert _console_errors(browser) == []


def test_build_page_shows_the_report_numbers(site, browser):
    from selenium.webdriver.common.by import By

    _open(browser, f"{site['url']}/builds/{site['sample']}", "#files")
    assert _console_errors(browser) == []
    models = [a for a in site["report"]["artifacts"] if a.get("role", "model") in ("model", "intermediate")]
    rows = browser.find_elements(By.CSS_SELECTOR, "#files tbody tr")
    assert [r.get_attribute("data-file") for r in rows] == [a["filename"] for a in models]
    assert len(rows) >= 5  # the sample's ladder
    headers = [h.text for h in browser.find_elements(By.CSS_SELECTOR, "#files thead th")]
    for row, artifact in zip(rows, models):
        cells = dict(zip(headers, row.find_elements(By.TAG_NAME, "td")))
        e = artifact["evaluation"]
        assert cells["File"].text == artifact["filename"]
        assert int(cells["Size"].get_attribute("data-value")) == artifact["size_bytes"]
        assert float(cells["KLD ± error"].get_attribute("data-value")) == e["kld_mean"]
        assert cells["KLD ± error"].text == f"{e['kld_mean']:.4f} ± {e['kld_se']:.4f}"
        assert float(cells["Top-1"].get_attribute("data-value")) == e["top1_agreement"]
        assert float(cells["PPL ± error"].get_attribute("data-value")) == e["perplexity"]
        assert cells["PPL ± error"].text.startswith(f"{e['perplexity']:.3f} ± ")
        assert cells["Smoke test"].text == ("pass" if e["smoke_passed"] else "FAIL")
        assert cells["Checks"].text == ("FAILED" if artifact["failures"] else "pass")
        assert ("failed" in (row.get_attribute("class") or "")) == bool(artifact["failures"])
        assert 0 <= e["kld_mean"] < 1.0 and e["perplexity"] > 1  # a real evaluation, not zeros
    # The plot arrived and is an image the browser could draw.
    plot = browser.find_element(By.ID, "plot")
    assert browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", plot) > 300
    provenance = browser.find_element(By.ID, "provenance").text
    assert "quantkit's bundled sample" in provenance and site["report"]["source"]["architecture"] in provenance
    assert browser.find_element(By.ID, "inversions").text
    _screenshot(browser, "build.png")
    page = browser.page_source
    assert str(site["tmp"]) not in page and str(Path.home()) + "/" not in page


def test_html_in_a_report_is_shown_as_text(site, browser):
    from selenium.webdriver.common.by import By

    _open(browser, f"{site['url']}/builds/Evil", "#files")
    assert browser.execute_script("return window.__pwned") is None
    assert browser.find_element(By.ID, "model").text == f"Evil {EVIL}"
    reply = browser.find_elements(By.CSS_SELECTOR, ".smoke-reply")[0].text
    assert reply == f"{EVIL} and a local path …/x.gguf"
    assert browser.find_elements(By.CSS_SELECTOR, "#smoke script, #model img") == []
    assert _console_errors(browser) == []
    _open(browser, f"{site['url']}/builds", "#builds")
    assert browser.execute_script("return window.__pwned") is None
    assert _console_errors(browser) == []


def test_a_missing_build_and_a_busy_port_are_clear(site, browser):
    from selenium.webdriver.common.by import By

    _open(browser, f"{site['url']}/builds/nope", "#problem")
    assert "no build 'nope'" in browser.find_element(By.ID, "problem").text
    port = site["url"].rsplit(":", 1)[1]
    proc = run_cli("serve", "--port", port, "--builds", site["tmp"] / "builds", "--queue", site["queue"].path, timeout=60)
    assert proc.returncode == 1
    assert f"error: cannot serve the dashboard on 127.0.0.1:{port}" in proc.stderr
    assert "fix: pass another --port" in proc.stderr


@pytest.mark.parametrize("text, shown", [
    ("cannot write to /home/ana/builds/M/out.gguf: denied", "cannot write to …/out.gguf: denied"),
    ("see https://huggingface.co/org/m/blob/main/config.json", "see https://huggingface.co/org/m/blob/main/config.json"),
    ("queue postgresql://bob:s3cret@db:5432/q refused", "queue postgresql://bob:***@db:5432/q refused"),
    (f"401 with {FAKE_TOKEN}", "401 with hf_***"),
    (f"HF_TOKEN={FAKE_TOKEN} set", "HF_TOKEN=hf_*** set"),
    ("password: hunter2", "password: ***"),
    ("KLD 0.01 / 0.02, a/b/c", "KLD 0.01 / 0.02, a/b/c"),
])
def test_what_a_page_may_show(text, shown):
    assert public_text(text) == shown
