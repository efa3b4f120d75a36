"""Start-up time of the command line: seconds from launch to the first token ``chunkattn generate`` prints,
and to ``chunkattn serve`` answering ``/health`` with 200, on the default model (SmolLM2-135M GGUF).

    python benchmarks/startup.py [--src DIR] [--runs 2] [--json PATH] [--args "--dtype bfloat16"]

The first run of each starts with an empty weight cache (``CHUNKATTN_CACHE_DIR`` set to a fresh directory),
the later ones reuse it (a row's ``cache``: an earlier start filled that directory; it means nothing for code
without the weight cache). The first start of a checkout may also rebuild the native extension (alternating
checkouts invalidate its build): compare the later starts. ``--src`` runs another checkout's ``src`` (e.g.
the commit before the cache, for a before/after in one sweep).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path


def _env(src: str | None, cache: str) -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "CHUNKATTN_CACHE_DIR": cache}
    if src:
        env["PYTHONPATH"] = str(Path(src).resolve())
    return env


def time_generate(env: dict[str, str], extra: list[str]) -> tuple[float, float]:
    """(seconds to the first byte on stdout, seconds to exit)."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "chunkattn.cli", "generate", "The capital of France is",
                             "--max-tokens", "8", *extra], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
    assert proc.stdout is not None
    proc.stdout.read(1)
    first = time.perf_counter() - start
    proc.wait(300)
    return first, time.perf_counter() - start


def time_serve(env: dict[str, str], extra: list[str]) -> float:
    """Seconds until /health answers 200."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "chunkattn.cli", "serve", "--port", str(port), *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"serve exited with {proc.returncode}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                    if r.status == 200:
                        return time.perf_counter() - start
            except OSError:
                pass
            if time.perf_counter() - start > 300:
                raise RuntimeError("serve did not become healthy in 300 s")
            time.sleep(0.05)
    finally:
        proc.terminate()
        proc.wait(60)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", nargs="+", default=[None], help="checkouts' src directories to time (default: this)")
    ap.add_argument("--runs", type=int, default=2, help="starts per command (the first with an empty cache)")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--args", default="", help="more arguments for both commands, e.g. \"--dtype bfloat16\"")
    args = ap.parse_args()
    extra = args.args.split()
    rows = []
    for src in args.src:
        with tempfile.TemporaryDirectory(prefix="chunkattn-cache-") as cache:
            env = _env(src, cache)
            for run in range(args.runs):
                first, total = time_generate(env, extra)
                rows.append({"src": src or "installed", "command": "generate", "run": run, "cache": run > 0,
                             "first_token_s": round(first, 2), "exit_s": round(total, 2)})
                print(rows[-1], flush=True)
            for run in range(args.runs):
                rows.append({"src": src or "installed", "command": "serve", "run": run, "cache": True,
                             "healthy_s": round(time_serve(env, extra), 2)})
                print(rows[-1], flush=True)
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    result = {"benchmark": "benchmarks/startup.py", "date": time.strftime("%Y-%m-%d"), "cpu": cpu,
              "cores": os.cpu_count(), "args": args.args, "rows": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
