#!/usr/bin/env bash
# Install DeepSpeed into the environment of PYTHON (the Makefile passes the venv's python), for
# `distributed.engine: deepspeed`.  Idempotent, and it never breaks the overall install: when
# DeepSpeed cannot be installed it says why and exits 0 (the DeepSpeed tests then skip with that
# reason).
#
#   bash scripts/install_deepspeed.sh [PYTHON]
#
# What it does:
#   1. pip install --no-build-isolation deepspeed==$DEEPSPEED_VERSION with DS_BUILD_OPS=0 (no
#      compiled ops at install; DeepSpeed's sdist imports torch in setup.py, so it must build against
#      the torch already installed), under a constraint file that pins the installed torch (and
#      torchvision) so pip can never swap them.
#   2. Pre-builds DeepSpeed's CPU shared-memory communication op (what deepspeed.init_distributed
#      JIT-compiles with g++/ninja on first use, ~30 s) into the torch extensions cache
#      ($TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions), so runs and tests don't pay for it.
#      Skipped on a machine with CUDA (NCCL does the communication there).
set -u
PY="${1:-python3}"
DEEPSPEED_VERSION="${DEEPSPEED_VERSION:-0.19.8}"

say() { echo "install_deepspeed: $*"; }
give_up() { say "DeepSpeed NOT installed: $* (the DeepSpeed engine and its tests are unavailable; DDP still works)"; exit 0; }

"$PY" -c "import torch" 2>/dev/null || give_up "torch is not importable with $PY; install the project first"

# DeepSpeed probes for an accelerator at import and warns on stdout when it falls back to the CPU.
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
fi
have_version=$("$PY" -c "import importlib.metadata as m, sys; sys.stdout.write(m.version('deepspeed'))" 2>/dev/null || true)
if [ "$have_version" = "$DEEPSPEED_VERSION" ]; then
    say "deepspeed $have_version already installed"
else
    command -v g++ >/dev/null 2>&1 || say "warning: no g++ — DeepSpeed's CPU ops cannot be compiled"
    pins=$(mktemp)
    trap 'rm -f "$pins"' EXIT
    "$PY" - "$pins" <<'EOF' || give_up "could not read the installed torch version"
import importlib.metadata as md, sys
with open(sys.argv[1], "w") as fh:
    for name in ("torch", "torchvision"):
        try:
            fh.write(f"{name}=={md.version(name)}\n")
        except md.PackageNotFoundError:
            pass
EOF
    say "installing deepspeed==$DEEPSPEED_VERSION against $(tr '\n' ' ' < "$pins")"
    # Build requirements of the sdist that --no-build-isolation expects to find installed.
    "$PY" -m pip install -q -c "$pins" setuptools wheel packaging ninja py-cpuinfo hjson psutil \
        || give_up "pip could not install DeepSpeed's build requirements"
    t0=$(date +%s)
    if ! DS_BUILD_OPS=0 DS_SKIP_CUDA_CHECK=1 "$PY" -m pip install -q --no-build-isolation -c "$pins" \
            "deepspeed==$DEEPSPEED_VERSION"; then
        give_up "pip install deepspeed==$DEEPSPEED_VERSION failed (see pip's output above)"
    fi
    say "pip install took $(( $(date +%s) - t0 )) s"
    "$PY" -c "import deepspeed" 2>/dev/null || give_up "deepspeed installed but does not import: $("$PY" -c 'import deepspeed' 2>&1 | tail -1)"
    "$PY" - "$pins" <<'EOF' || give_up "the install changed torch; reinstall the project (make install)"
import importlib.metadata as md, sys
for line in open(sys.argv[1]):
    name, want = line.strip().split("==")
    if md.version(name) != want:
        raise SystemExit(f"{name} is now {md.version(name)}, was {want}")
EOF
fi

# Pre-build the CPU shared-memory op (only the CPU accelerator uses it).
t0=$(date +%s)
out=$("$PY" - 2>&1 <<'EOF'
import sys
from deepspeed.accelerator import get_accelerator
acc = get_accelerator()
if acc.device_name() != "cpu":
    print(f"accelerator is {acc.device_name()}: no CPU op to build")
    sys.exit(0)
builder = acc.create_op_builder("ShareMemCommBuilder")
if builder is None or not builder.is_compatible():
    print("the shared-memory op is not available for this CPU; DeepSpeed will use plain gloo")
    sys.exit(0)
builder.load(verbose=False)
print(f"{builder.absolute_name()} is built and cached")
EOF
)
rc=$?
say "$(echo "$out" | tail -1) ($(( $(date +%s) - t0 )) s)"
[ $rc -eq 0 ] || say "warning: pre-building the CPU op failed; DeepSpeed will try again at first use"
exit 0
