"""Before/after benchmark of two chunkattn revisions: the serve rows and the decode-attention kernel points of
``benchmarks/peer_vllm_cpu.sh`` (chunkattn's side only), the two revisions alternated run by run so that this
VM's drift falls on both evenly; one JSON with every run, medians and after/before ratios.

    python benchmarks/ab_revs.py --before 8fd6b40 [--after HEAD|worktree] [--runs 3] [--dtypes "bfloat16 float32"]
        [--rows a] [--points "32/1024/64 32/4096/64/9/3/64"] [--requests 32] [--model file.gguf]
        --json benchmarks/results/<name>.json

Each revision's ``src/`` is extracted with ``git archive`` into ``$PEER_DIR/src-<commit>`` (``--after worktree``:
this checkout's ``src/``) and imported through ``PYTHONPATH``; each run is a fresh process. Runs nothing
concurrently (2-core machines); say which CPU it ran on when quoting it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from chunkattn.system import cpu  # (this checkout's: the machine, not a revision)

REPO = Path(__file__).resolve().parents[1]
PEER_DIR = Path(os.environ.get("PEER_DIR", "/work/peer"))
ROWS = {"a": ["--system-prompts", "1", "--shared-len", "1024"], "b": ["--system-prompts", "1", "--shared-len", "4096"],
        "c": ["--system-prompts", "8", "--shared-len", "1024"]}
SERVE_KEYS = ("output_tokens_per_s", "ttft_p50_ms", "tpot_p50_ms")


def git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(REPO), *args], check=True, capture_output=True, text=True).stdout.strip()


def source_of(rev: str) -> tuple[Path, str]:
    """(src directory, description) of a revision; ``worktree`` is this checkout's src/ as it is."""
    if rev == "worktree":
        dirty = " + uncommitted changes" if git("status", "--porcelain", "--", "src") else ""
        return REPO / "src", f"worktree at {git('rev-parse', '--short', 'HEAD')}{dirty}"
    commit = git("rev-parse", "--short", rev)
    dest = PEER_DIR / f"src-{commit}"
    if not (dest / "src").is_dir():
        dest.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "-C", str(REPO), "archive", commit, "src"], check=True, capture_output=True)
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    return dest / "src", f"commit {commit}"


def run(src: Path, args: list[str], out: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(src)}
    proc = subprocess.run([sys.executable, "-m", "chunkattn.cli", *args, "--json", str(out), "--no-progress"],
                          env=env, capture_output=True, text=True)
    if proc.returncode != 0 or not out.exists():
        sys.exit(f"failed: chunkattn {' '.join(args)} (PYTHONPATH={src})\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", required=True)
    p.add_argument("--after", default="worktree")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--dtypes", default="bfloat16 float32")
    p.add_argument("--rows", default="a")
    p.add_argument("--points", default="32/1024/64 32/2048/64 32/16/1024 32/1024/64/9/3/64")
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--model", help="the serve rows' model (default: chunkattn's, SmolLM2's GGUF file)")
    p.add_argument("--json", required=True)
    a = p.parse_args()
    sides = {"before": source_of(a.before), "after": source_of(a.after)}
    runs: list[dict] = []
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.runs):
            order = ["before", "after"] if r % 2 == 0 else ["after", "before"]
            for dtype in a.dtypes.split():
                for row in a.rows.split():
                    args = ["bench", "serve", "--systems", "chunkattn", *ROWS[row], "--requests", str(a.requests),
                            "--rate", "inf", "--question-len", "64", "--output-len", "64", "--dtype", dtype,
                            *(["--model", a.model] if a.model else [])]
                    for side in order:
                        res = run(sides[side][0], args, Path(tmp) / "serve.json")["rows"][0]
                        runs.append({"kind": "serve", "side": side, "run": r, "dtype": dtype, "row": row,
                                     **{k: res[k] for k in SERVE_KEYS}})
                        print(json.dumps(runs[-1]), flush=True)
                for point in a.points.split():
                    b, ns, nc, *rest = point.split("/")
                    h, hkv, d = rest if rest else ("32", "32", "128")
                    args = ["bench", "kernel", "--batch", b, "--shared", ns, "--private", nc, "--heads", h,
                            "--kv-heads", hkv, "--head-dim", d, "--dtype", dtype, "--providers", "tpp-cpu"]
                    for side in order:
                        res = run(sides[side][0], args, Path(tmp) / "kernel.json")["rows"][0]
                        runs.append({"kind": "kernel", "side": side, "run": r, "dtype": dtype, "point": point,
                                     "median_us": res["median_us"]})
                        print(json.dumps(runs[-1]), flush=True)
    summary = []
    for key in dict.fromkeys((x["kind"], x["dtype"], x.get("row") or x.get("point")) for x in runs):
        kind, dtype, what = key
        sel = {s: [x for x in runs if (x["kind"], x["dtype"], x.get("row") or x.get("point")) == key and x["side"] == s]
               for s in sides}
        metrics = SERVE_KEYS if kind == "serve" else ("median_us",)
        entry = {"kind": kind, "dtype": dtype, "what": what}
        for m in metrics:
            before, after = (statistics.median(x[m] for x in sel[s]) for s in ("before", "after"))
            entry[m] = {"before": before, "after": after, "after_over_before": round(after / before, 3),
                        "before_range": [min(x[m] for x in sel["before"]), max(x[m] for x in sel["before"])],
                        "after_range": [min(x[m] for x in sel["after"]), max(x[m] for x in sel["after"])]}
        summary.append(entry)
    after_commit = git("rev-parse", "--short", "HEAD" if a.after == "worktree" else a.after)
    out = {"benchmark": "ab-revs", "date": time.strftime("%Y-%m-%d"), "started": started, "system": {"cpu": cpu()},
           "commit": after_commit,
           "before": sides["before"][1], "after": sides["after"][1], "runs_per_side": a.runs,
           "requests": a.requests, "command": "python benchmarks/ab_revs.py " + " ".join(sys.argv[1:]),
           "summary": summary, "runs": runs}
    Path(a.json).write_text(json.dumps(out, indent=1) + "\n")
    for e in summary:
        ratios = ", ".join(f"{m} {e[m]['after_over_before']}x" for m in e if isinstance(e[m], dict))
        print(f"{e['kind']} {e['dtype']} {e['what']}: after/before {ratios}")


if __name__ == "__main__":
    main()
