"""Drive ComfyUI's real web frontend in headless Chromium over the Chrome DevTools protocol.

Used by tests/test_frontend.py and scripts/capture_thumbnails.py.  Needs:
- Debian's ``chromium`` (or any Chromium/Chrome: ``CHROMIUM`` names the binary),
- the ``comfyui-frontend-package`` that the ComfyUI version pins (its ``static/`` folder is served
  through ``--front-end-root``),
- ``websocket-client`` (the DevTools protocol is JSON over one websocket).

The protocol is used directly (no Puppeteer/Playwright): one page target, requests answered by id,
events buffered.  Console messages, uncaught exceptions and browser log entries are kept in
``Page.console`` for the caller to judge.
"""
from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from comfy_harness import stop_process_group

# Settings stored for the scratch ComfyUI user before the page opens: no first-run template
# browser, no minimap or canvas info overlay, no dialogs about files this machine doesn't have.
QUIET_SETTINGS = {
    "Comfy.TutorialCompleted": True,
    "Comfy.Minimap.Visible": False,
    "Comfy.Graph.CanvasInfo": False,
    "Comfy.Graph.CanvasMenu": False,
    "Comfy.Workflow.ShowMissingModelsWarning": False,
    "Comfy.Workflow.ShowMissingNodesWarning": False,
    "Comfy.Validation.Workflows": True,
    "Comfy.EnableWorkflowViewRestore": False,
    "Comfy.Canvas.SelectionToolbox": False,
    "Comfy.Workflow.Persist": False,
    "Comfy.LoadDefaultWorkflow": False,
    "Comfy.NodeBadge.NodeIdBadgeMode": "None",
    "LiteGraph.Canvas.MinFontSizeForLOD": 0,   # always draw text (thumbnails are zoomed out)
}


def find_chromium() -> str | None:
    env = os.environ.get("CHROMIUM")
    if env:
        return shutil.which(env) or (env if Path(env).is_file() else None)
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        p = shutil.which(name)
        if p:
            return p
    return None


def frontend_static_dir() -> Path | None:
    """``static/`` of the installed comfyui-frontend-package, or None."""
    try:
        import comfyui_frontend_package
    except ImportError:
        return None
    d = Path(comfyui_frontend_package.__file__).parent / "static"
    return d if (d / "index.html").is_file() else None


def frontend_version(static_dir: Path | None = None) -> str | None:
    """Version of the installed comfyui-frontend-package, or of the one whose ``static/`` is given
    (read from the ``*.dist-info`` beside it, as ``pip install --target`` leaves it)."""
    if static_dir is not None:
        for info in sorted(Path(static_dir).resolve().parent.parent.glob("comfyui_frontend_package-*.dist-info")):
            return info.name[len("comfyui_frontend_package-"):-len(".dist-info")]
    try:
        from importlib.metadata import version
        return version("comfyui-frontend-package")
    except Exception:
        return None


def pinned_frontend_version(comfyui_dir: Path) -> str | None:
    """The comfyui-frontend-package version ComfyUI's requirements.txt pins."""
    req = comfyui_dir / "requirements.txt"
    if not req.is_file():
        return None
    for line in req.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line.startswith("comfyui-frontend-package") and "==" in line:
            return line.split("==", 1)[1].strip()
    return None


class CDPError(RuntimeError):
    pass


@dataclass
class ConsoleEntry:
    kind: str      # console.<level> / exception / log.<level>
    text: str
    url: str = ""

    def __str__(self):
        return f"[{self.kind}] {self.text}" + (f" ({self.url})" if self.url else "")


class Browser:
    """A headless Chromium process with one page, controlled over the DevTools protocol."""

    def __init__(self, width: int = 1600, height: int = 1000, binary: str | None = None):
        self.binary = binary or find_chromium()
        if not self.binary:
            raise RuntimeError("no Chromium found (apt-get install chromium, or set CHROMIUM)")
        self.width, self.height = width, height
        self.profile = Path(tempfile.mkdtemp(prefix="salad_chromium_"))
        self.proc: subprocess.Popen | None = None
        self.ws = None
        self._id = 0
        self.events: list[dict] = []
        self.console: list[ConsoleEntry] = []

    # -- lifecycle -------------------------------------------------------------------------
    def start(self, timeout: float = 60) -> "Browser":
        import websocket  # websocket-client
        cmd = [self.binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
               "--no-first-run", "--no-default-browser-check", "--disable-extensions",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--mute-audio", "--hide-scrollbars", "--force-device-scale-factor=1",
               f"--window-size={self.width},{self.height}", f"--user-data-dir={self.profile}",
               "--remote-debugging-port=0", "--remote-allow-origins=*", "about:blank"]
        self._log = open(self.profile / "chromium.log", "wb")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        port_file = self.profile / "DevToolsActivePort"
        deadline = time.time() + timeout
        port = None
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"chromium exited with {self.proc.returncode}: {self.log()[-2000:]}")
            if port_file.is_file():
                lines = port_file.read_text().split()
                if lines:
                    port = int(lines[0])
                    break
            time.sleep(0.1)
        if port is None:
            self.stop()
            raise TimeoutError(f"chromium opened no DevTools port in {timeout}s: {self.log()[-2000:]}")
        ws_url = None
        while time.time() < deadline and ws_url is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=5) as r:
                    targets = json.loads(r.read())
                pages = [t for t in targets if t.get("type") == "page"]
                if pages:
                    ws_url = pages[0]["webSocketDebuggerUrl"]
            except Exception:
                time.sleep(0.2)
        if ws_url is None:
            self.stop()
            raise TimeoutError("chromium listed no page target")
        self.ws = websocket.create_connection(ws_url, timeout=timeout, suppress_origin=True,
                                              enable_multithread=False)
        for domain in ("Page", "Runtime", "Log"):
            self.send(f"{domain}.enable")
        self.send("Emulation.setDeviceMetricsOverride",
                  {"width": self.width, "height": self.height, "deviceScaleFactor": 1, "mobile": False})
        return self

    def stop(self):
        if self.ws is not None:
            try:
                self.ws.close()
            except Exception:
                pass
            self.ws = None
        stop_process_group(self.proc, grace=10)
        if getattr(self, "_log", None):
            self._log.close()
            self._log = None
        shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def log(self) -> str:
        try:
            return (self.profile / "chromium.log").read_text(errors="replace")
        except FileNotFoundError:
            return ""

    # -- protocol ----------------------------------------------------------------------------
    def _handle_event(self, msg: dict):
        method, p = msg.get("method"), msg.get("params", {})
        if method == "Runtime.consoleAPICalled":
            parts = []
            for a in p.get("args", []):
                if "value" in a:
                    parts.append(a["value"] if isinstance(a["value"], str) else json.dumps(a["value"]))
                else:
                    parts.append(a.get("description") or a.get("type", ""))
            frames = (p.get("stackTrace") or {}).get("callFrames") or [{}]
            self.console.append(ConsoleEntry(f"console.{p.get('type')}", " ".join(map(str, parts)),
                                             frames[0].get("url", "")))
        elif method == "Runtime.exceptionThrown":
            d = p.get("exceptionDetails", {})
            text = (d.get("exception") or {}).get("description") or d.get("text", "")
            self.console.append(ConsoleEntry("exception", text, d.get("url", "")))
        elif method == "Log.entryAdded":
            e = p.get("entry", {})
            self.console.append(ConsoleEntry(f"log.{e.get('level')}", e.get("text", ""), e.get("url", "")))
        else:
            self.events.append(msg)
            del self.events[:-200]

    def send(self, method: str, params: dict | None = None, timeout: float = 60) -> dict:
        self._id += 1
        mid = self._id
        self.ws.send(json.dumps({"id": mid, "method": method, "params": params or {}}))
        deadline = time.time() + timeout
        while True:
            left = deadline - time.time()
            if left <= 0:
                raise TimeoutError(f"no answer to {method} in {timeout}s")
            self.ws.settimeout(left)
            msg = json.loads(self.ws.recv())
            if msg.get("id") == mid:
                if "error" in msg:
                    raise CDPError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            if "method" in msg:
                self._handle_event(msg)

    def pump(self, seconds: float):
        """Read events for a while (console messages that arrive after the last call)."""
        end = time.time() + seconds
        while time.time() < end:
            self.eval("1")
            time.sleep(0.05)

    def eval(self, expression: str, timeout: float = 60):
        """Evaluate JS in the page (promises awaited) and return its JSON value."""
        r = self.send("Runtime.evaluate", {"expression": expression, "awaitPromise": True,
                                           "returnByValue": True, "userGesture": True}, timeout=timeout)
        if "exceptionDetails" in r:
            d = r["exceptionDetails"]
            text = (d.get("exception") or {}).get("description") or d.get("text")
            raise CDPError(f"JS error: {text}\n  in: {expression[:300]}")
        return r.get("result", {}).get("value")

    def wait_for(self, expression: str, timeout: float = 90, what: str | None = None):
        deadline = time.time() + timeout
        last_err = None
        while time.time() < deadline:
            try:
                v = self.eval(expression)
                if v:
                    return v
            except CDPError as e:
                last_err = e
            time.sleep(0.2)
        raise TimeoutError(f"timed out ({timeout}s) waiting for {what or expression}"
                           + (f"; last error: {last_err}" if last_err else ""))

    def navigate(self, url: str):
        self.send("Page.navigate", {"url": url})

    def screenshot(self, fmt: str = "jpeg", quality: int = 90, clip: dict | None = None) -> bytes:
        params = {"format": fmt, "captureBeyondViewport": False}
        if fmt == "jpeg":
            params["quality"] = quality
        if clip:
            params["clip"] = {**clip, "scale": clip.get("scale", 1)}
        return base64.b64decode(self.send("Page.captureScreenshot", params)["data"])


# -- ComfyUI frontend helpers ----------------------------------------------------------------
def store_settings(server, settings: dict = QUIET_SETTINGS):
    """Write frontend settings for the server's default user before the page loads."""
    for key, value in settings.items():
        status, body = server.post(f"/settings/{key}", value)
        if status != 200:
            raise RuntimeError(f"POST /settings/{key} answered {status}: {body}")


def open_frontend(browser: Browser, server, required_types=(), timeout: float = 120):
    """Load the frontend from the server and wait until the app, its graph and node defs are ready."""
    browser.navigate(server.url + "/")
    check = ("window.app && window.app.graph && window.app.canvas && window.LiteGraph"
             " && Object.keys(window.LiteGraph.registered_node_types).length > 20")
    for t in required_types:
        check += f" && !!window.LiteGraph.registered_node_types[{json.dumps(t)}]"
    try:
        browser.wait_for(check, timeout=timeout, what="ComfyUI frontend (window.app and node definitions)")
    except TimeoutError as e:
        state = browser.eval("JSON.stringify({url: location.href, ready: document.readyState,"
                             " app: !!window.app, graph: !!(window.app && window.app.graph),"
                             " types: window.LiteGraph"
                             " ? Object.keys(window.LiteGraph.registered_node_types).length : -1})")
        raise TimeoutError(f"{e}\npage state: {state}\nconsole:\n" +
                           "\n".join(map(str, browser.console[-30:]))) from None
    # the app sets itself up asynchronously after the node defs arrive; give it a moment to settle
    browser.wait_for("document.readyState === 'complete'", timeout=30)
    browser.pump(0.5)


LOAD_JS = r"""
(async (wf) => {
  const app = window.app;
  await app.loadGraphData(wf, true, true, null,
      {showMissingNodesDialog: false, showMissingModelsDialog: false});
  await new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)));
  const registered = window.LiteGraph.registered_node_types;
  const nodes = app.graph._nodes.map(n => ({
    id: n.id, type: n.type, mode: n.mode, title: n.title,
    registered: !!registered[n.type],
    has_errors: !!n.has_errors,
    widgets: (n.widgets || []).map(w => ({name: w.name, type: w.type, value: w.value,
                                          in_options: (w.options && Array.isArray(w.options.values))
                                                      ? w.options.values.includes(w.value) : null,
                                          serialize: !(w.options && w.options.serialize === false)
                                                     && w.serialize !== false})),
    serialized: n.serialize().widgets_values ?? null,
  }));
  const links = app.graph.links instanceof Map ? Object.fromEntries(app.graph.links) : app.graph.links || {};
  return {nodes, link_count: Object.keys(links).length};
})
"""


def load_workflow(browser: Browser, workflow: dict) -> dict:
    """Load a UI workflow with app.loadGraphData and report what the frontend made of it."""
    return browser.eval(f"{LOAD_JS}({json.dumps(workflow)})", timeout=120)
