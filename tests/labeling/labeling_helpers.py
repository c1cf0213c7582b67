"""Helpers shared by the labeling tests: source files, free ports, servers in a thread or a
process, a fake clock. Everything listens on 127.0.0.1 only.
"""
import contextlib
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx

ROOT = pathlib.Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_source(folder, n_train=8, n_eval=2, k=3, special=None):
    """``folder/{train,eval}.jsonl`` as ``collect --labeler export`` writes them, plus gold.

    Response ``j`` of every item has gold score ``j`` (the last response is the best) and a text
    unique within the item. ``special`` replaces responses of ``train-0``: ``{j: text}``.
    """
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    recs = {}
    for split, n in (("train", n_train), ("eval", n_eval)):
        rows = []
        for i in range(n):
            responses = [f"{split} {i}: response {j} " + "lorem ipsum " * j for j in range(k)]
            if split == "train" and i == 0 and special:
                for j, text in special.items():
                    responses[j] = text
            rows.append({"id": f"{split}-{i}", "prompt": f"Prompt {i} ({split}): the movie was",
                         "responses": responses, "ranks": None, "labeler": "",
                         "policies": [f"policy{j}@T=1.0" for j in range(k)],
                         "gold_scores": [float(j) for j in range(k)]})
        if n:
            with open(folder / f"{split}.jsonl", "w", encoding="utf-8") as f:
                for r in rows:
                    f.write(json.dumps(r) + "\n")
        recs[split] = rows
    return recs


class FakeClock:
    def __init__(self, t=1_000_000.0):
        self.t = t

    def __call__(self):
        return self.t

    def advance(self, dt):
        self.t += dt


class ThreadServer:
    """The app served by uvicorn in a background thread (real HTTP on 127.0.0.1)."""

    def __init__(self, app):
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port,
                                                    log_level="warning", access_log=False))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=10)


class ProcessServer:
    """``python -m rlhf_jax.labeling serve ...`` in a subprocess; can be SIGKILLed and restarted."""

    def __init__(self, args, port=None, log_path=None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = [sys.executable, "-m", "rlhf_jax.labeling", "serve", *map(str, args),
                     "--port", str(self.port)]
        self.log_path = log_path
        self.proc = None
        self.starts = 0

    def start(self, timeout=60.0):
        env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(self.args, cwd=ROOT, env=env, stdout=log, stderr=log)
        self.starts += 1
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: "
                                   f"{self.log_text()[-2000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/api/health", timeout=1, trust_env=False).is_success:
                    return self
            time.sleep(0.1)
        raise RuntimeError(f"server did not answer within {timeout} s")

    def kill(self):
        """SIGKILL: no shutdown handler runs, nothing is flushed by the server."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()

    def log_text(self):
        return pathlib.Path(self.log_path).read_text(errors="replace") if self.log_path else ""
