#!/usr/bin/env bash
# The blockwise pipeline on a real one-node Slurm cluster, started here and stopped at the end:
#   bash scripts/slurm/test-one-node.sh VIMSEG_BINARY CHECKPOINT SETTING
# (e.g. target/debug/vimseg, a cremi checkpoint folder, cremi). Needs root and Debian's
# packages (installed by one-node.sh). Checks, on a synthetic EM volume:
# 1. an array job chain (predict -> finish -> segment -> stitch -> evaluate) whose predict task
#    1 is cancelled mid-run stops, and its resubmission completes with output equal, chunk
#    file for chunk file, to the one-process result (and mSA 1 against it);
# 2. a segment task that meets a damaged prediction chunk fails: Slurm records it FAILED, the
#    finish job is cancelled, `vimseg status` names the failed blocks, every other block is
#    kept; mended and resubmitted, the result again equals the one-process result.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
vimseg="$(realpath "$1")"
ckpt="$(realpath "$2")"
setting="$3"
work="$(mktemp -d)"
cluster="$work/slurm"
cleanup() {
  bash "$here/one-node.sh" stop "$cluster" || true
  rm -rf "$work"
}
trap cleanup EXIT
fail() { echo "FAILED: $*" >&2; exit 1; }

bash "$here/one-node.sh" install
bash "$here/one-node.sh" start "$cluster" > /dev/null
export SLURM_CONF="$cluster/slurm.conf" VIMSEG="$vimseg"
jobcomp="$cluster/jobcomp.txt"

"$vimseg" data synth --dir "$work/data" > /dev/null
raw="$work/data/cremi/sampleC.h5"
P="--checkpoint $ckpt --input $raw --slices 0:12 --tile 32 --halo 16"
S="--setting $setting --block 32 --halo 16"

# The one-process reference.
# shellcheck disable=SC2086
"$vimseg" predict $P --out "$work/ref-pred.zarr" > /dev/null
# shellcheck disable=SC2086
"$vimseg" segment --pred "$work/ref-pred.zarr" $S --out "$work/ref-seg.zarr" > /dev/null
[ -d "$work/ref-seg.zarr/0/c" ] || fail "the reference segmentation is empty"
same() { # same chunk files, byte for byte
  diff -r "$1/0/c" "$2/0/c" > /dev/null || fail "$2 differs from $1"
}
state_of() { # the jobcomp record of job $1 (array task: $1 = ARRAYJOB_TASK)
  local job="${1%_*}" task=""
  [ "$job" != "$1" ] && task="${1#*_}"
  if [ -n "$task" ]; then
    grep "ArrayJobId=$job ArrayTaskId=$task " "$jobcomp" | sed -n 's/.*JobState=\([A-Z_]*\).*/\1/p' | tail -1
  else
    grep "^JobId=$job " "$jobcomp" | sed -n 's/.*JobState=\([A-Z_]*\).*/\1/p' | tail -1
  fi
}
wait_gone() { # until none of the jobs is queued or running
  for _ in $(seq 600); do
    [ -z "$(squeue -h -j "$(IFS=,; echo "$*")" 2>/dev/null)" ] && return 0
    sleep 0.5
  done
  fail "jobs $* did not end"
}

# 1. The chain, with predict task 1 cancelled mid-run, then resubmitted.
run="$work/run"
bash "$here/submit" --work "$run" --tasks 4 --predict "$P" --segment "$S" \
  --gt "$work/ref-seg.zarr" > /dev/null
# shellcheck disable=SC1091
. "$run/jobs.env"
blocks=$("$vimseg" status "$run/pred.zarr" --json | sed -n 's/^  "blocks": \([0-9]*\),/\1/p')
first=$((blocks / 4)) end=$((2 * blocks / 4))
done_in_task1() {
  local n=0
  for i in $(seq "$first" $((end - 1))); do [ -e "$run/pred.zarr/blocks/$i" ] && n=$((n + 1)); done
  echo "$n"
}
# Freeze task 1's process once it has finished a block, so that the cancel lands mid-run.
pid=""
for _ in $(seq 3000); do
  for p in $(pgrep -f -- "--task" || true); do
    if tr '\0' '\n' < "/proc/$p/environ" 2>/dev/null | grep -qx "SLURM_ARRAY_JOB_ID=$PREDICT_JOB" \
      && tr '\0' '\n' < "/proc/$p/environ" 2>/dev/null | grep -qx "SLURM_ARRAY_TASK_ID=1"; then
      pid="$p"
    fi
  done
  if [ -n "$pid" ] && [ "$(done_in_task1)" -ge 1 ]; then
    kill -STOP "$pid"
    break
  fi
  sleep 0.01
done
[ -n "$pid" ] || fail "predict task 1 never ran"
k=$(done_in_task1)
[ "$k" -lt $((end - first)) ] || fail "task 1 finished before it could be cancelled"
scancel "${PREDICT_JOB}_1"
wait_gone "$PREDICT_JOB" "$PREDICT_FINISH_JOB" "$SEGMENT_JOB" "$STITCH_JOB" "$EVALUATE_JOB"
[ "$(state_of "${PREDICT_JOB}_1")" = CANCELLED ] || fail "task 1 is not recorded as cancelled"
for t in 0 2 3; do
  [ "$(state_of "${PREDICT_JOB}_$t")" = COMPLETED ] || fail "predict task $t did not complete"
done
[ ! -e "$run/seg.zarr/0/c" ] || fail "the chain went on after a cancelled task"
echo "cancelled predict task 1 mid-run ($k of $((end - first)) blocks done); the chain stopped:"
"$vimseg" status "$run/pred.zarr" | sed 's/^/  /'
bash "$here/submit" --work "$run" --tasks 4 --predict "$P" --segment "$S" \
  --gt "$work/ref-seg.zarr" --wait > /dev/null || fail "the resubmitted chain failed"
same "$work/ref-pred.zarr" "$run/pred.zarr"
same "$work/ref-seg.zarr" "$run/seg.zarr"
grep -q '"msa": 1.0' "$run/scores.json" || fail "mSA against the reference is not 1: $(cat "$run/scores.json")"
echo "resubmitted: prediction and segmentation equal the one-process result chunk for chunk"

# 2. A damaged prediction chunk: the segment task that reads it fails, nothing else is lost.
cp -r "$run/pred.zarr" "$work/bad-pred.zarr"
chunk="$work/bad-pred.zarr/0/c/0/3/2/2"
cp "$chunk" "$work/good-chunk"
echo "damaged" > "$chunk"
seg2="$work/seg2.zarr"
s_cmd=(segment --pred "$work/bad-pred.zarr" --out "$seg2")
# shellcheck disable=SC2206
s_cmd+=($S)
"$vimseg" "${s_cmd[@]}" --plan 2 > /dev/null
array=$(sbatch --parsable --array=0-1 -o "$work/seg2-%A_%a.out" "$here/task.sbatch" "${s_cmd[@]}")
fin=$(sbatch --parsable --dependency=afterok:"$array" -o "$work/fin-%j.out" "$here/finish.sbatch" "$seg2")
wait_gone "$array" "$fin"
[ "$(state_of "${array}_0")" = FAILED ] || fail "the task with the damaged chunk is not FAILED"
[ "$(state_of "${array}_1")" = COMPLETED ] || fail "the other task did not complete"
fstate=$(scontrol show job "$fin" | sed -n 's/.*JobState=\([A-Z_]*\).*/\1/p')
[ "$fstate" = CANCELLED ] || fail "the finish job is $fstate, not CANCELLED"
status=$("$vimseg" status "$seg2" --json)
n_failed=$(echo "$status" | grep -c '"block":' || true)
n_done=$(echo "$status" | sed -n 's/^  "done": \([0-9]*\),/\1/p')
n_blocks=$(echo "$status" | sed -n 's/^  "blocks": \([0-9]*\),/\1/p')
[ "$n_failed" -ge 1 ] && [ $((n_done + n_failed)) = "$n_blocks" ] \
  || fail "status: $n_done done + $n_failed failed of $n_blocks"
echo "damaged chunk: task 0 FAILED (Slurm), finish CANCELLED, $n_failed blocks failed, $n_done kept:"
"$vimseg" status "$seg2" | sed -n "1,3p" | sed 's/^/  /'
cp "$work/good-chunk" "$chunk"
sbatch --wait --array=0-1 -o "$work/seg2b-%A_%a.out" "$here/task.sbatch" "${s_cmd[@]}" > /dev/null \
  || fail "the resubmitted segment tasks failed"
"$vimseg" finish "$seg2" > /dev/null
same "$work/ref-seg.zarr" "$seg2"
echo "mended and resubmitted: equal to the one-process result"
echo "slurm one-node test: passed"
