#!/usr/bin/env bash
# make demo: DINO on 2 ranks (FSDP2, gloo) with asynchronous checkpoints. The job is run
# once straight; then again with one rank SIGKILLed at a random moment after a save, and
# relaunched with --checkpoint.resume latest. The two final states (student, teacher,
# optimizer, loss centre) must be equal bit for bit. Then the experiment's checkpoints,
# the figures of its saves, and the teacher of the best checkpoint on one process.
set -uo pipefail
PYTHON=${PYTHON:-python3}
NPROC=${NPROC:-2}
STRATEGY=${STRATEGY:-fsdp}
STEPS=${STEPS:-40}
ROOT=${ROOT:-./demo_runs}
KILL_SEED=${KILL_SEED:-$RANDOM}
MAX_DELAY=${MAX_DELAY:-3}       # the kill lands up to this many seconds after a commit
read -r -a EXTRA <<<"${EXTRA:-}"  # more train_dino.py arguments (the tests' smaller runs)
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

# launch/dino.sh: torchrun --standalone --nproc_per_node=$NPROC launch/train_dino.py ...
TRAIN=(env PYTHON="$PYTHON" NPROC="$NPROC" STRATEGY="$STRATEGY" bash launch/dino.sh
       --max-steps "$STEPS" --checkpoint.dir "$ROOT" --no-bar "${EXTRA[@]}")
show() { grep -hE "$1" "$2" | sed 's/^/   /'; }
fail() { echo "FAILED: $1 (log: $2)"; tail -n 30 "$2"; exit 1; }

rm -rf "$ROOT" && mkdir -p "$ROOT"
echo "== 1/4 DINO, $STEPS steps straight on $NPROC ranks ($STRATEGY), async checkpoints"
"${TRAIN[@]}" --checkpoint.experiment_name straight --digest-out "$ROOT/straight.json" \
  >"$ROOT/straight.log" 2>&1 || fail "the straight run" "$ROOT/straight.log"
show "DINO|^step|k-NN|final state" "$ROOT/straight.log"

echo "== 2/4 the same job; rank $((NPROC - 1)) SIGKILLed at a random moment after a save" \
     "(seed $KILL_SEED)"
"$PYTHON" launch/kill_rank.py --experiment "$ROOT/resumed" --rank $((NPROC - 1)) \
  --seed "$KILL_SEED" --max-delay "$MAX_DELAY" -- \
  "${TRAIN[@]}" --checkpoint.experiment_name resumed >"$ROOT/killed.log" 2>&1 \
  || fail "the kill" "$ROOT/killed.log"
show "^kill_rank|^checkpoint step" "$ROOT/killed.log"

echo "== 3/4 relaunched with --checkpoint.resume latest, up to step $STEPS"
"${TRAIN[@]}" --checkpoint.experiment_name resumed --checkpoint.resume latest \
  --digest-out "$ROOT/resumed.json" >"$ROOT/resumed.log" 2>&1 \
  || fail "the resumed run" "$ROOT/resumed.log"
show "resumed from|^step|k-NN|final state" "$ROOT/resumed.log"
if "$PYTHON" - "$ROOT/straight.json" "$ROOT/resumed.json" <<'PY'
import json, sys
a, b = (json.load(open(p)) for p in sys.argv[1:])
for key in ("student", "teacher", "optimizer", "center"):
    print(f"   {key:<10} {'equal' if a[key] == b[key] else 'DIFFERENT'}  {b[key][:16]}")
sys.exit(a != b)
PY
then
  echo "RESULT: the killed and resumed run equals the uninterrupted one bit for bit"
else
  echo "RESULT: MISMATCH between the resumed and the uninterrupted run"; exit 1
fi

echo "== 4/4 the experiment"
"$PYTHON" -m dcp_engine ls "$ROOT/resumed" || exit 1
echo "   saves of the killed run and of its resumption:"
show "^checkpoint step" "$ROOT/killed.log"
show "^checkpoint step" "$ROOT/resumed.log"
"$PYTHON" launch/eval_dino.py "$ROOT/resumed" --which best || exit 1
