"""The web console in a real browser: Debian's headless Chromium driven by Selenium against a real
daemon on a loopback port. Sessions and commands are made through the JSON API (or the console's
own forms) and watched arriving in the pages without a reload.

Screenshots of every page go to .cache/screenshots/ (git-ignored) for a person to look at.
Every test also checks the browser's console: no Content-Security-Policy violation, no script error.
"""

from __future__ import annotations

import json
import shutil
import signal
import sqlite3
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import httpx
import pytest

from tests.daemons import API_KEY

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="!!! THE CONSOLE'S BROWSER TESTS DID NOT RUN: Debian's chromium and chromium-driver are not "
           "installed (tools/debian-deps, run by `make install`, installs them) !!!")
SCREENSHOTS = Path(__file__).resolve().parent.parent / ".cache" / "screenshots"
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--window-size=1280,900")
WAIT_S = 20


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    downloads = tmp_path_factory.mktemp("downloads")
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                              "download.prompt_for_download": False})
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    driver.downloads = downloads
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    try:
        yield driver
    finally:
        driver.quit()


class Console:
    """One daemon seen through the browser."""

    def __init__(self, driver, daemon):
        self.b = driver
        self.d = daemon
        self.b.get("about:blank")   # the last test's page stops polling its (gone) daemon
        self.b.execute_cdp_cmd("Network.clearBrowserCookies", {})   # every daemon is 127.0.0.1: one cookie jar
        self.b.get_log("browser")   # forget what earlier tests left

    # --- browsing ---------------------------------------------------------------------
    def url(self, path: str) -> str:
        return self.d.url + path

    def open(self, path: str) -> None:
        self.b.get(self.url(path))

    def path(self) -> str:
        return urlparse(self.b.current_url).path

    def login(self, key: str = API_KEY, then: str = "/console/sessions") -> None:
        self.open(then)
        assert self.path() == "/console/login", self.b.current_url
        self.el("#key").send_keys(key)
        self.el("#login-button").click()
        self.wait(lambda: self.path() == then, f"logged in and sent on to {then}")

    def el(self, css: str):
        from selenium.webdriver.common.by import By
        return self.b.find_element(By.CSS_SELECTOR, css)

    def els(self, css: str) -> list:
        from selenium.webdriver.common.by import By
        return self.b.find_elements(By.CSS_SELECTOR, css)

    def text(self, css: str) -> str:
        """textContent, also of collapsed parts (Selenium's .text is only what is visible)."""
        found = self.els(css)
        return found[0].get_attribute("textContent") if found else ""

    def wait(self, condition, what: str, timeout: float = WAIT_S):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                value = condition()
            except Exception:  # noqa: BLE001 - an element replaced while we looked: look again
                value = None
            if value:
                return value
            time.sleep(0.1)
        self.shot("failed-wait")
        raise AssertionError(f"timed out waiting for: {what} (at {self.b.current_url})")

    def accept_confirm(self) -> str:
        self.wait(lambda: self._alert(), "a confirmation dialog")
        alert = self.b.switch_to.alert
        text = alert.text
        alert.accept()
        return text

    def _alert(self):
        try:
            return self.b.switch_to.alert
        except Exception:  # noqa: BLE001 - NoAlertPresentException
            return None

    def shot(self, name: str) -> Path:
        path = SCREENSHOTS / f"{name}.png"
        self.b.save_screenshot(str(path))
        return path

    def live(self) -> None:
        self.wait(lambda: self.el("#live").get_attribute("data-state") == "live", "the page's live feed")

    def assert_clean_console(self, allowed: tuple[str, ...] = ()) -> None:
        """No CSP violation and no script error was logged since the last look."""
        problems = [e["message"] for e in self.b.get_log("browser")
                    if e["level"] == "SEVERE" or "Content Security Policy" in e["message"]]
        problems = [m for m in problems if not any(a in m for a in allowed)]
        assert problems == [], problems

    # --- the API, as an agent would use it ----------------------------------------------
    def create(self, **body) -> str:
        r = self.d.client.post("/v1/sessions", json=body)
        assert r.status_code == 201, r.text
        return r.json()["id"]

    def run(self, sid: str, cmd: str) -> dict:
        r = self.d.client.post(f"/v1/sessions/{sid}/exec", json={"cmd": cmd})
        assert r.status_code == 200, r.text
        return r.json()

    def downloaded(self, suffix: str, before: set[str]) -> Path:
        def fresh():
            done = [p for p in self.b.downloads.iterdir()
                    if p.name not in before and p.name.endswith(suffix)]
            return done[0] if done else None
        return self.wait(fresh, f"a downloaded *{suffix}")


@pytest.fixture
def console(browser, daemon):
    return Console(browser, daemon)


def test_every_page_without_the_cookie_redirects_to_login(console):
    sid = console.create()
    console.run(sid, "echo secret-output-7")
    protected = ["/console", "/console/sessions", f"/console/sessions/{sid}", f"/console/sessions/{sid}/files",
                 f"/console/sessions/{sid}/processes/p-0123456789ab", "/console/workspaces", "/console/audit",
                 "/console/audit/export?format=jsonl", "/console/metrics", "/console/feed/sessions",
                 f"/console/feed/sessions/{sid}", "/console/static/console.js", "/console/static/session.js",
                 "/console/assets/xterm.js"]
    for path in protected:
        console.open(path)
        assert console.path() == "/console/login", path
        assert console.els("#login-form") and "secret-output-7" not in console.b.page_source
        assert console.el('input[name="next"]').get_attribute("value") == path.split("?")[0]
        r = httpx.get(console.url(path))   # and without a browser: a redirect, no data
        assert r.status_code == 303 and r.headers["location"].startswith("/console/login"), (path, r.status_code)
        assert sid not in r.text
    console.shot("login")
    console.el("#key").send_keys("not-the-key")
    console.el("#login-button").click()
    console.wait(lambda: console.els("#login-error"), "the login error")
    assert "wrong API key" in console.text("#login-error") and console.path() == "/console/login"
    console.login(then=f"/console/sessions/{sid}")
    assert "secret-output-7" in console.text("#timeline")
    cookie = console.b.get_cookie("sk_console")
    assert cookie["httpOnly"] is True and cookie["sameSite"] == "Strict" and cookie["secure"] is False
    console.el(".logout button").click()
    console.wait(lambda: console.path() == "/console/login", "logged out")
    console.open("/console/sessions")
    assert console.path() == "/console/login"
    console.assert_clean_console(allowed=("/console/login - Failed to load resource",))


def test_a_session_appears_without_reload_shows_live_stats_and_is_destroyed_after_confirmation(console):
    console.login()
    console.live()
    console.b.execute_script("window.__noReload = 42")
    sid = console.create()
    row = f'#session-rows tr[data-id="{sid}"]'
    console.wait(lambda: console.els(row), "the new session's row")
    assert console.b.execute_script("return window.__noReload") == 42
    assert console.text(f"{row} .status") == "running"
    console.run(sid, "true")
    console.wait(lambda: console.text(f"{row} td:nth-child(5)") == "1", "its exec count")
    console.wait(lambda: console.els(f"{row} svg.spark polyline"), "cpu and memory plots")
    assert "MiB" in console.text(f"{row} td:nth-child(7)")
    console.el("#search").send_keys(sid[-6:])
    console.wait(lambda: len(console.els("#session-rows tr")) == 1, "the search keeping the session")
    console.el("#search").send_keys("zzz")
    console.wait(lambda: not console.els("#session-rows tr"), "the search hiding it")
    console.el("#search").clear()
    console.el("#search").send_keys(" ")
    console.wait(lambda: console.els(row), "the row back")
    console.shot("sessions")
    console.el(f"{row} button.danger").click()
    assert sid in console.accept_confirm()
    console.wait(lambda: not console.els(row), "the destroyed session leaving the table")
    assert console.b.execute_script("return window.__noReload") == 42
    assert console.d.client.get(f"/v1/sessions/{sid}").json()["status"] == "destroyed"
    with sqlite3.connect(console.d.data_dir / "sandkasten.db") as db:
        actor, = db.execute("SELECT actor FROM events WHERE stream_id = ? AND type = 'session.destroy_requested'",
                            (sid,)).fetchone()
    db.close()
    assert actor.startswith("console:")
    console.el("#show-ended").click()
    console.wait(lambda: console.text(f"{row} .status") == "destroyed", "the ended session, when asked for")
    console.assert_clean_console()


def test_command_output_arrives_live_and_is_shown_as_text(console):
    sid = console.create()
    console.login(then=f"/console/sessions/{sid}")
    console.live()
    results = {}
    slow = threading.Thread(target=lambda: results.update(console.run(
        sid, "for i in 1 2 3 4 5 6 7 8; do echo tick$i; sleep 0.5; done")))
    slow.start()
    try:
        entry = console.wait(lambda: console.els("li.exec[data-status=running]"), "the running command")[0]
        key = entry.get_attribute("data-key")
        console.wait(lambda: "tick2" in console.text(f"#entry-{key} pre.out"), "output while it runs")
        assert console.d.client.get(f"/v1/sessions/{sid}/execs/{key}").json()["status"] == "running"
    finally:
        slow.join(timeout=30)
    assert results["exit_code"] == 0
    console.wait(lambda: console.els(f'#entry-{key}[data-status="finished"]'), "the finished command")
    assert console.text(f"#entry-{key} .exit") == "exit 0"
    assert console.text(f"#entry-{key} pre.out").split() == [f"tick{i}" for i in range(1, 9)]

    # typed into the console's own form: markup prints as text, colours are drawn
    xss = "printf '<script>window.__xss=1</script><img src=x onerror=\"window.__xss=2\">\\n'; " \
          "printf '\\033[32mgreen\\033[0m\\n'; exit 4"
    console.el("#run-cmd").send_keys(xss)
    console.el("#run-form button").click()
    done = '#timeline li.exec[data-status="finished"]'
    console.wait(lambda: len(console.els(done)) == 2, "the typed command, finished")
    last = console.els(done)[-1]
    key2 = last.get_attribute("data-key")
    assert console.text(f"#entry-{key2} .exit") == "exit 4"
    out = console.text(f"#entry-{key2} pre.out")
    assert '<script>window.__xss=1</script><img src=x onerror="window.__xss=2">' in out
    assert console.text(f"#entry-{key2} code.cmd") == xss
    assert console.els("#timeline script, #timeline img") == []
    assert console.b.execute_script("return window.__xss === undefined")
    assert console.text(f"#entry-{key2} span.ansi-fg-2") == "green"
    with sqlite3.connect(console.d.data_dir / "sandkasten.db") as db:
        actor, = db.execute("SELECT actor FROM events WHERE type = 'exec.requested' AND payload LIKE ?",
                            ('%' + key2 + '%',)).fetchone()
    db.close()
    assert actor.startswith("console:")
    console.shot("session")
    console.assert_clean_console()


def test_timeline_after_a_daemon_sigkill_and_restart(browser, daemon_factory):
    daemon = daemon_factory().start()
    console = Console(browser, daemon)
    sid = console.create()
    console.run(sid, "echo before-the-crash")
    console.run(sid, "echo failing >&2; exit 3")
    console.login(then=f"/console/sessions/{sid}")
    daemon.kill(signal.SIGKILL)
    daemon.start()
    console.open(f"/console/sessions/{sid}")   # the cookie outlives the daemon: no new login
    assert console.path() == f"/console/sessions/{sid}"
    console.live()
    execs = console.els("#timeline li.exec")
    assert [e.get_attribute("data-status") for e in execs] == ["finished", "finished"]
    assert [console.text(f"#{e.get_attribute('id')} .exit") for e in execs] == ["exit 0", "exit 3"]
    assert "before-the-crash" in console.text(f"#{execs[0].get_attribute('id')} pre.out")
    assert "failing" in console.text(f"#{execs[1].get_attribute('id')} pre.out")
    facts = [e.get_attribute("data-type") for e in console.els("#timeline li.fact")]
    assert facts == ["session.requested", "sandbox.started", "sandbox.adopted"]
    console.run(sid, "echo after-the-restart")
    console.wait(lambda: "after-the-restart" in console.text("#timeline"), "a new command after the restart")
    console.assert_clean_console(allowed=("net::ERR_CONNECTION_",))   # requests in flight at the kill


def test_terminal_is_read_only_until_input_is_allowed(console):
    sid = console.create()
    console.login(then=f"/console/sessions/{sid}")
    console.live()
    console.el("#shell-cmd").clear()
    console.el("#shell-cmd").send_keys("sh")
    console.el("#shell-form button").click()   # starts `sh` on a PTY through the API, then opens it
    console.wait(lambda: "/processes/p-" in console.path(), "the new terminal's page")
    pid = console.path().rsplit("/", 1)[1]
    console.live()
    console.wait(lambda: "/workspace" in console.text(".xterm-rows"), "the shell's prompt in the terminal")
    console.el(".xterm-helper-textarea").send_keys("echo ignored\n")
    time.sleep(1)
    proc = console.d.client.get(f"/v1/sessions/{sid}/processes/{pid}").json()
    assert proc["input_bytes"] == 0 and proc["pty"] == {"rows": 24, "cols": 100}
    console.el("#allow-input").click()
    console.el(".xterm-helper-textarea").send_keys("echo hel''lo-from-the-browser\n")
    console.wait(lambda: "hello-from-the-browser" in console.text(".xterm-rows"), "the shell's answer")
    assert console.d.client.get(f"/v1/sessions/{sid}/processes/{pid}").json()["input_bytes"] > 0
    console.shot("terminal")
    with sqlite3.connect(console.d.data_dir / "sandkasten.db") as db:
        actors = {a for a, in db.execute("SELECT actor FROM events WHERE stream_id = ? AND type IN "
                                          "('process.requested', 'process.input')", (sid,))}
    db.close()
    assert len(actors) == 1 and actors.pop().startswith("console:")
    console.open(f"/console/sessions/{sid}")
    console.wait(lambda: console.els(f'#process-rows tr[data-process="{pid}"]'), "the process in the list")
    assert "running" in console.text(f'#process-rows tr[data-process="{pid}"]')
    entry = f"#entry-{pid}"
    typed = "".join(c.get_attribute("textContent") for c in console.els(f"{entry} .input-list code"))
    assert "echo hel''lo-from-the-browser" in typed   # what was typed (one POST per burst), from the journal
    console.el(f'#process-rows tr[data-process="{pid}"] button.danger').click()
    console.accept_confirm()
    console.wait(lambda: console.els(f'{entry}[data-status="exited"]'), "the killed process in the timeline")
    console.open(f"/console/audit?session={sid}")
    typed = "".join(c.get_attribute("textContent") for c in reversed(console.els("#audit-rows code.typed")))
    assert "echo hel''lo-from-the-browser" in typed   # what was typed, for the auditor (newest row first)
    kinds = {row.find_element("css selector", "td:nth-child(4)").text for row in console.els("#audit-rows tbody tr")}
    assert kinds == {"process", "input"}
    console.assert_clean_console()


def test_files_browse_download_and_upload(console, tmp_path):
    sid = console.create()
    r = console.d.client.post(f"/v1/sessions/{sid}/fs/write", json={"path": "sub/notes.txt", "text": "hello files\n"})
    assert r.status_code == 200, r.text
    console.login(then=f"/console/sessions/{sid}/files")
    console.el('#file-table tr[data-name="sub"] a').click()
    console.wait(lambda: console.els('#file-table tr[data-name="notes.txt"]'), "the file in sub/")
    before = {p.name for p in console.b.downloads.iterdir()}
    console.el('#file-table tr[data-name="notes.txt"] a.download').click()
    assert console.downloaded("notes.txt", before).read_text() == "hello files\n"
    local = tmp_path / "upload me.bin"
    local.write_bytes(bytes(range(256)))
    console.el("#upload-files").send_keys(str(local))
    console.el("#upload-form button").click()
    console.wait(lambda: console.els('#file-table tr[data-name="upload me.bin"]'), "the uploaded file listed")
    r = console.d.client.get(f"/v1/sessions/{sid}/fs/read", params={"path": "sub/upload me.bin"})
    assert r.status_code == 200 and r.json()["size"] == 256
    console.shot("files")
    console.open(f"/console/sessions/{sid}/files?path=/workspace/../../etc")
    assert "PATH_REFUSED" in console.text("#error-message")
    console.assert_clean_console(allowed=("/console/sessions/" + sid + "/files?path=",))


def test_audit_filters_export_and_the_broken_chain(console):
    one, two = console.create(), console.create()
    console.run(one, "echo first")
    console.run(two, "echo second; exit 2")
    console.login(then="/console/audit")
    assert console.el("#verify").get_attribute("data-ok") == "true"
    assert "Hash chain intact" in console.text("#verify")
    assert len(console.els("#audit-rows tr[data-exec]")) == 2
    console.el('#audit-filters input[name="session"]').send_keys(two)
    console.el("#audit-filters button").click()
    console.wait(lambda: len(console.els("#audit-rows tr[data-exec]")) == 1, "the filtered rows")
    assert "echo second; exit 2" in console.text("#audit-rows")
    console.shot("audit")
    before = {p.name for p in console.b.downloads.iterdir()}
    console.el("#export-jsonl").click()
    rows = [json.loads(line) for line in console.downloaded(".jsonl", before).read_text().splitlines()]
    assert [(r["session"], r["cmd"], r["exit_code"]) for r in rows] == [(two, "echo second; exit 2", 2)]
    before = {p.name for p in console.b.downloads.iterdir()}
    console.el("#export-csv").click()
    lines = console.downloaded(".csv", before).read_text().splitlines()
    assert lines[0].startswith("actor,requested_at,session") and len(lines) == 2 and two in lines[1]

    with sqlite3.connect(console.d.data_dir / "sandkasten.db") as db:
        seq, = db.execute("SELECT seq FROM events WHERE stream_id = ? AND type = 'exec.requested'", (two,)).fetchone()
        db.execute("DROP TRIGGER events_no_update")
        db.execute("UPDATE events SET actor = 'mallory' WHERE seq = ?", (seq,))
    db.close()
    console.open("/console/audit")
    assert console.el("#verify").get_attribute("data-ok") == "false"
    assert f"seq {seq}," in console.text("#first-bad") and "mallory" in console.text("#first-bad")
    console.shot("audit-broken")
    console.assert_clean_console()


def test_metrics_and_workspaces_pages(browser, daemon_factory):
    console = Console(browser, daemon_factory(pool={"enabled": True, "images": {"base": 2}}).start())
    sid = console.create(workspace_id="console-ws")
    for cmd in ("true", "sleep 0.2", "false"):
        console.d.client.post(f"/v1/sessions/{sid}/exec", json={"cmd": cmd})
    console.login(then="/console/metrics")
    assert console.text("#latency-summary").startswith("3 finished commands: p50")
    assert len(console.els("#latency-chart rect.bar")) == 16
    counts = [int(t.get_attribute("textContent")) for t in console.els("#latency-chart text.count")]
    assert sum(counts) == 3
    assert "3 commands" in console.text("#numbers") and "1 non-zero exits" in console.text("#numbers")

    def pool_full():
        console.open("/console/metrics")
        return console.text('#pool tr[data-image="base"] .idle') == "2"
    console.wait(pool_full, "the warm pool's two idle members")
    assert console.text('#pool tr[data-image="base"] .target') == "2"
    alive = [s for s in console.d.client.get("/v1/sessions?all=true").json() if s["status"] == "running"]
    assert console.text("#alive-summary").startswith(f"{len(alive)} alive now")
    console.shot("metrics")
    console.open("/console/workspaces")
    row = '#workspaces tr[data-id="console-ws"]'
    assert sid in console.text(row)
    console.shot("workspaces")
    console.el(f"{row} a").click()
    console.wait(lambda: console.path() == "/console/workspaces/console-ws/files", "the workspace's files")
    console.assert_clean_console()
