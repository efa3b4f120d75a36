"""Send a real ``chunkattn serve`` process the bad inputs users send, and write what each gets as the table
of ``docs/serving.md`` (between its ``<!-- bad-inputs -->`` markers): generated, not hand-edited.

    python benchmarks/bad_inputs.py [--write docs/serving.md]

The server is the tests' small random-weight model with SmolLM2's tokenizer (fast to start), on a free
loopback port, with an API key and a 200 kB body limit; it is stopped at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
KEY = "sk-bad-inputs"
MAX_BODY = 200_000

# (what, route, body (a dict is sent as JSON; bytes as is, with the content type), headers beyond the key)
CASES: list[tuple[str, str, Any, dict[str, str]]] = [
    ("invalid JSON", "/v1/completions", b"{not json", {}),
    ("a JSON array as the body", "/v1/completions", b"[1, 2]", {}),
    ("a text/plain body", "/v1/completions", b"prompt=hi", {"content-type": "text/plain"}),
    ("no prompt", "/v1/completions", {"max_tokens": 3}, {}),
    ("empty prompt", "/v1/completions", {"prompt": ""}, {}),
    ("prompt: []", "/v1/completions", {"prompt": []}, {}),
    ("prompt: [[]]", "/v1/completions", {"prompt": [[]]}, {}),
    ("prompt: [-1]", "/v1/completions", {"prompt": [-1]}, {}),
    ("prompt: [1.5]", "/v1/completions", {"prompt": [1.5]}, {}),
    ("prompt: [1, \"a\"]", "/v1/completions", {"prompt": [1, "a"]}, {}),
    ("prompt: an object", "/v1/completions", {"prompt": {"text": "x"}}, {}),
    ("300 prompts", "/v1/completions", {"prompt": ["x"] * 300}, {}),
    ("a token id beyond the vocabulary", "/v1/completions", {"prompt": [1, 2, 10**7]}, {}),
    ("a prompt longer than the context", "/v1/completions", {"prompt": list(range(2100))}, {}),
    ("a lone surrogate (\\ud800)", "/v1/completions", b'{"prompt": "a\\ud800b"}', {}),
    ("max_tokens: \"ten\"", "/v1/completions", {"prompt": "x", "max_tokens": "ten"}, {}),
    ("max_tokens: -1", "/v1/completions", {"prompt": "x", "max_tokens": -1}, {}),
    ("max_tokens beyond the context", "/v1/completions", {"prompt": "x", "max_tokens": 10**9}, {}),
    ("more K/V than the cache holds", "/v1/completions", {"prompt": "x", "max_tokens": 2000, "n": 5}, {}),
    ("n: 0", "/v1/completions", {"prompt": "x", "n": 0}, {}),
    ("temperature: -1", "/v1/completions", {"prompt": "x", "temperature": -1}, {}),
    ("top_p: 0", "/v1/completions", {"prompt": "x", "top_p": 0}, {}),
    ("logprobs: 100", "/v1/completions", {"prompt": "x", "logprobs": 100}, {}),
    ("stop: [\"\"]", "/v1/completions", {"prompt": "x", "stop": [""]}, {}),
    ("17 stop strings", "/v1/completions", {"prompt": "x", "stop": ["s"] * 17}, {}),
    ("stop: [3]", "/v1/completions", {"prompt": "x", "stop": [3]}, {}),
    ("logit_bias key not a token id", "/v1/completions", {"prompt": "x", "logit_bias": {"abc": 1}}, {}),
    ("logit_bias key beyond the vocabulary", "/v1/completions", {"prompt": "x", "logit_bias": {"99999999": 1}}, {}),
    ("logit_bias value 101", "/v1/completions", {"prompt": "x", "logit_bias": {"5": 101}}, {}),
    ("stop_token_ids beyond the vocabulary", "/v1/completions", {"prompt": "x", "stop_token_ids": [10**8]}, {}),
    ("suffix", "/v1/completions", {"prompt": "x", "suffix": "y"}, {}),
    ("an unknown model", "/v1/completions", {"prompt": "x", "model": "gpt-4"}, {}),
    ("a body over --max-body-bytes", "/v1/completions", {"prompt": "x" * (MAX_BODY + 10)}, {}),
    ("chat: no messages", "/v1/chat/completions", {"messages": []}, {}),
    ("chat: role \"bot\"", "/v1/chat/completions", {"messages": [{"role": "bot", "content": "x"}]}, {}),
    ("chat: a message without a role", "/v1/chat/completions", {"messages": [{"content": "x"}]}, {}),
    ("chat: an image part", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, {}),
    ("chat: top_logprobs without logprobs", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, {}),
    ("no API key", "/v1/completions", {"prompt": "x"}, {"authorization": ""}),
    ("a wrong API key", "/v1/completions", {"prompt": "x"}, {"authorization": "Bearer wrong"}),
    ("the scheme in lower case (accepted)", "/v1/completions", {"prompt": "x", "max_tokens": 1},
     {"authorization": f"bearer {KEY}"}),
    ("an unknown route", "/v1/nothing", {}, {}),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run() -> list[dict[str, Any]]:
    from chunkattn.model import default_model_path

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "chunkattn.cli", "serve", str(ROOT / "tests" / "data" / "tiny-llama" / "config.json"),
           "--random-weights", "--tokenizer", str(default_model_path()), "--served-model-name", "tiny",
           "--kv-cache-tokens", "8192", "--chunk-size", "16", "--max-body-bytes", str(MAX_BODY), "--api-key", KEY,
           "--port", str(port), "--log-level", "warning"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    rows = []
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.2)
        for what, route, body, extra in CASES:
            headers = {"authorization": f"Bearer {KEY}", "content-type": "application/json", **extra}
            headers = {k: v for k, v in headers.items() if v}
            content = body if isinstance(body, bytes) else json.dumps(body).encode()
            r = httpx.post(url + route, content=content, headers=headers, timeout=60)
            err = r.json().get("error") if r.headers.get("content-type", "").startswith("application/json") else None
            rows.append({"input": what, "route": route, "status": r.status_code,
                         "message": err["message"] if err else "(a completion)",
                         "param": err["param"] if err else None})
    finally:
        proc.terminate()
        proc.wait(30)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    def cell(text: str) -> str:
        text = text if len(text) <= 160 else text[:157] + "..."
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| input | route | status | message | param |", "|---|---|---|---|---|"]
    lines += [f"| {cell(r['input'])} | `{r['route']}` | {r['status']} | {cell(r['message'])} | "
              f"{'`' + r['param'] + '`' if r['param'] else ''} |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--write", help="replace the table between the <!-- bad-inputs --> markers of this file")
    args = ap.parse_args()
    text = table(run())
    if args.write:
        path = Path(args.write)
        doc = path.read_text()
        new, count = re.subn(r"(<!-- bad-inputs -->\n)(?:.*?\n)?(<!-- /bad-inputs -->)",
                             lambda m: m.group(1) + text + "\n" + m.group(2), doc, flags=re.S)
        if count != 1:
            raise SystemExit(f"{path} has no <!-- bad-inputs --> ... <!-- /bad-inputs --> block")
        path.write_text(new)
        print(f"wrote {path}")
    else:
        print(text)


if __name__ == "__main__":
    main()
