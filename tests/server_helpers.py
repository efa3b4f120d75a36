"""Start a real ``chunkattn serve`` process on 127.0.0.1 (a free port) for the server tests."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

TINY_CONFIG = Path(__file__).parent / "data" / "tiny-llama" / "config.json"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def metrics(url: str, headers: dict[str, str] | None = None) -> dict[str, float]:
    """``/metrics`` as {name{labels}: value} (labels dropped when only model_name)."""
    response = httpx.get(url + "/metrics", timeout=30, headers=headers)
    response.raise_for_status()  # not a scrape: fail on the status, not on parsing its body
    text = response.text
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name, value = line.rsplit(" ", 1)
        name = re.sub(r'model_name="[^"]*",?', "", name).replace(",}", "}").replace("{}", "")
        out[name] = float(value)
    return out


class ServerProcess:
    """``chunkattn serve ARGS`` in a subprocess; ``url`` is its base URL once healthy."""

    def __init__(self, *args: str, api_key: str | None = None, timeout: float = 180.0):
        self.port = free_port()
        self.api_key = api_key
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "chunkattn.cli", "serve", *args, "--port", str(self.port),
               "--log-level", "warning"]
        if api_key:
            cmd += ["--api-key", api_key]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        env.pop("CHUNKATTN_API_KEY", None)
        self.log = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the server did not become healthy in {timeout} s:\n{self.output()}")
            time.sleep(0.2)

    def output(self, whole: bool = False) -> str:
        self.log.seek(0)
        text = self.log.read()
        return text if whole else text[-5000:]

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def metrics(self) -> dict[str, float]:
        return metrics(self.url)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()
