#!/usr/bin/env bash
# Set-up for `make demo` / `make test` on a fresh machine, into the given Python.
# Never pulls the CUDA build of torch onto a machine without a GPU: an installed torch
# that satisfies the range (>= 2.6) is kept; otherwise a GPU machine gets the registry's
# torch and a CPU machine the pinned CPU wheel (`pip install torch==2.13.0` takes the
# CPU wheel that lies on disk on this kind of machine).
set -euo pipefail
PY=${1:-python3}
HERE=$(cd "$(dirname "$0")/.." && pwd -P)
export PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1

# Fast path: this checkout is the installed dcp_engine, its `dcp-engine` command exists
# and the test tools are there. (An editable install of another clone does not count.)
if (cd / && "$PY" - "$HERE" <<'PYEOF'
import os, sys, sysconfig
import dcp_engine, pytest, xdist, hypothesis, ruff, s3fs, moto, flask, aiohttp, lightning  # noqa: F401
ours = os.path.realpath(dcp_engine.__file__).startswith(sys.argv[1] + os.sep)
script = os.path.exists(os.path.join(sysconfig.get_path("scripts"), "dcp-engine"))
sys.exit(0 if ours and script else 1)
PYEOF
) >/dev/null 2>&1; then
  exit 0
fi

torch_ok() {
  "$PY" - <<'PYEOF'
import sys
try:
    import torch
except ImportError:
    sys.exit(1)
major, minor = (int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
sys.exit(0 if (major, minor) >= (2, 6) else 1)
PYEOF
}

if torch_ok; then
  echo "install: keeping torch $("$PY" -c 'import torch; print(torch.__version__)')"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  "$PY" -m pip install -q "torch>=2.6"
else
  "$PY" -m pip install -q "torch==2.13.0"
fi
"$PY" -m pip install -q -e ".[test,dev]"
