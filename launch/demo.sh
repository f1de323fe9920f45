#!/usr/bin/env bash
# make demo: a 2-rank FSDP2 job checkpoints, one rank is SIGKILLed mid-training, the job
# is relaunched with resume=latest, and its final state is compared bit for bit with an
# uninterrupted run of the same seed.
set -uo pipefail
PYTHON=${PYTHON:-python3}
NPROC=${NPROC:-2}
STEPS=${STEPS:-40}
SAVE_EVERY=${SAVE_EVERY:-10}
KILL_AT=${KILL_AT:-27}
ROOT=${ROOT:-./demo_runs}
export OMP_NUM_THREADS=1 LOGLEVEL=${LOGLEVEL:-WARNING}
# The scripts import this checkout's dcp_engine, whatever else is installed.
export PYTHONPATH="$(cd "$(dirname "$0")/.." && pwd -P)${PYTHONPATH:+:$PYTHONPATH}"

run() { "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" \
          launch/toy_fsdp.py --root "$ROOT" --steps "$STEPS" --save-every "$SAVE_EVERY" "$@"; }

rm -rf "$ROOT" && mkdir -p "$ROOT"
echo "== 1/3 uninterrupted run: $STEPS steps on $NPROC ranks (FSDP2, gloo)"
run --experiment straight --out "$ROOT/straight.sha256" || exit 1

echo "== 2/3 the same job, rank $((NPROC - 1)) SIGKILLed at step $KILL_AT"
if run --experiment resumed --kill-at-step "$KILL_AT" >"$ROOT/killed.log" 2>&1; then
  echo "expected the killed job to fail"; exit 1
fi
grep -h "SIGKILL at step" "$ROOT/killed.log"
ls "$ROOT/resumed/checkpoints"

echo "== 3/3 relaunch with resume=latest up to step $STEPS"
run --experiment resumed --resume latest --out "$ROOT/resumed.sha256" || exit 1

if cmp -s "$ROOT/straight.sha256" "$ROOT/resumed.sha256"; then
  echo "RESULT: resumed run equals the uninterrupted run bit for bit ($(cut -c1-16 "$ROOT/resumed.sha256"))"
else
  echo "RESULT: MISMATCH between the resumed and the uninterrupted run"; exit 1
fi
