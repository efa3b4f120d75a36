# Sourced by benchmarks/amx_check.sh and benchmarks/gpu_check.sh: run_part NAME SECONDS COMMAND... runs COMMAND
# under a time limit (killed 10 s after it), prints the last TAIL lines of its output (25) and its end, appends the
# whole output to $OUT/log.txt and, when SUMMARY names a file, the end line to it too; a failure is added to the
# caller's array `failed`, so that every part runs whatever the others did.
run_part() {
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  echo "== $name (limit ${limit} s) $(date +%T)"
  timeout -k 10 "$limit" "$@" > "$OUT/part.log" 2>&1
  local rc=$?
  tail -n "${TAIL:-25}" "$OUT/part.log"
  { echo "== $name"; cat "$OUT/part.log"; echo "== $name: rc=$rc in $((SECONDS - t0)) s"; } >> "$OUT/log.txt"
  rm -f "$OUT/part.log"
  echo "== $name: rc=$rc in $((SECONDS - t0)) s"
  [ -z "${SUMMARY:-}" ] || echo "== $name: rc=$rc in $((SECONDS - t0)) s" >> "$SUMMARY"
  [ "$rc" = 0 ] || failed+=("$name(rc=$rc)")
}
