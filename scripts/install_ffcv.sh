#!/usr/bin/env bash
# Install FFCV 1.0.2 (the fast .beton data path of rift_dist) into a Python environment.
#
# Usage:  scripts/install_ffcv.sh [PYTHON] [--strict]
#         PYTHON   the interpreter of the target environment (default: .venv/bin/python
#                  when it exists, else python3)
#         --strict exit 1 when FFCV cannot be installed (default: exit 0, see below)
#
# What it does (each step prints what it is doing):
#   1. `PYTHON -c "import ffcv"` works already  -> prints so and exits 0 (fast no-op).
#   2. Debian/Ubuntu: installs the build dependencies with apt-get, the small way:
#        pkg-config g++ libturbojpeg0-dev libopencv-core-dev libopencv-imgproc-dev
#      (~50 MB, instead of ~680 MB for libopencv-dev).  Needs root; without root it
#      says which packages to install.  Elsewhere it expects pkg-config to know
#      `libturbojpeg` and `opencv4` (or `opencv`).
#   3. FFCV's setup.py asks pkg-config for `opencv4` and its C++ includes
#      <opencv2/opencv.hpp>, which pulls in every OpenCV module's header.  With only
#      core + imgproc installed, a throw-away directory supplies an `opencv4.pc` and an
#      `opencv2/opencv.hpp` that includes just core.hpp and imgproc.hpp (all that
#      libffcv.cpp uses: cv::Mat, cv::resize).  Nothing outside that temp dir is written.
#   4. `pip install ffcv==1.0.2 pillow` (numba, llvmlite, opencv-python, fastargs,
#      terminaltables, assertpy, pytorch_pfn_extras, psutil come with it; pillow because
#      ffcv imports PIL without declaring it), with the installed numpy, torch,
#      torchvision and opencv-python pinned by a constraints file so pip cannot swap them.
#   5. Checks `import ffcv` and that the compiled extension loads.
#
# Never breaks the overall install: if FFCV cannot be built the script prints why and
# exits 0 (rift_dist then runs on the torch DataLoader: data.loader=auto picks it).
# Pass --strict to turn that into exit 1 (for images that must have FFCV).
set -uo pipefail

FFCV_VERSION="1.0.2"
APT_PACKAGES=(pkg-config g++ libturbojpeg0-dev libopencv-core-dev libopencv-imgproc-dev)

log() { echo "[install-ffcv] $*"; }

PYTHON=""
STRICT=0
for arg in "$@"; do
    case "$arg" in
        --strict) STRICT=1 ;;
        -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
        *) PYTHON="$arg" ;;
    esac
done
if [[ -z "$PYTHON" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi

give_up() {
    log "FFCV NOT installed: $*"
    log "rift_dist will use the torch DataLoader (data.loader=auto). Fix the cause above and rerun this script to enable FFCV."
    if [[ $STRICT -eq 1 ]]; then exit 1; fi
    exit 0
}

if ! command -v "$PYTHON" >/dev/null 2>&1; then
    give_up "python interpreter '$PYTHON' not found (pass the environment's python as the first argument)"
fi

# 1. fast no-op ---------------------------------------------------------------------------
# (Checked without `import ffcv`, which pulls in torch and numba and takes seconds: the
# package's metadata, then dlopen of the compiled extension, which fails if OpenCV or
# libturbojpeg went missing.)
have=$("$PYTHON" - 2>/dev/null <<'PYEOF'
import ctypes, glob, importlib.metadata as m, importlib.util, os
version = m.version("ffcv")
for dep in ("numba", "cv2", "PIL", "torch", "terminaltables", "fastargs", "assertpy", "psutil"):
    assert importlib.util.find_spec(dep) is not None, dep  # ffcv imports these (PIL undeclared)
spec = importlib.util.find_spec("ffcv")
libs = [p for d in spec.submodule_search_locations for p in glob.glob(os.path.join(d, "_libffcv*.so"))]
ctypes.CDLL(libs[0])
print(version)
PYEOF
)
if [[ -n "$have" ]]; then
    log "ffcv $have already installed in $PYTHON's environment (extension loads); nothing to do"
    exit 0
fi

start=$(date +%s)

# 2. system build dependencies -------------------------------------------------------------
pc_has() { pkg-config --exists "$1" 2>/dev/null; }

if command -v dpkg-query >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
    missing=()
    for pkg in "${APT_PACKAGES[@]}"; do
        status=$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null || true)
        [[ "$status" == "installed" ]] || missing+=("$pkg")
    done
    # A full libopencv-dev (opencv4.pc present) makes the two small opencv packages unnecessary.
    if pc_has opencv4 || pc_has opencv; then
        kept=()
        for pkg in "${missing[@]}"; do
            [[ "$pkg" == libopencv-core-dev || "$pkg" == libopencv-imgproc-dev ]] || kept+=("$pkg")
        done
        missing=("${kept[@]+"${kept[@]}"}")
    fi
    if [[ ${#missing[@]} -gt 0 ]]; then
        if [[ $(id -u) -ne 0 ]]; then
            give_up "missing Debian packages: ${missing[*]} (not root). Run: sudo apt-get install -y --no-install-recommends ${missing[*]}"
        fi
        log "apt-get install -y --no-install-recommends ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        policy_out=$(apt-cache policy "${missing[0]}" 2>/dev/null || true)
        if ! grep -q 'Candidate: [0-9]' <<<"$policy_out"; then
            log "package lists look empty; running apt-get update"
            apt-get -o DPkg::Lock::Timeout=900 update || give_up "apt-get update failed"
        fi
        apt-get -o DPkg::Lock::Timeout=900 install -y --no-install-recommends "${missing[@]}" \
            || give_up "apt-get install ${missing[*]} failed (see apt's message above)"
    else
        log "build dependencies present: ${APT_PACKAGES[*]}"
    fi
else
    log "not a Debian system: expecting pkg-config, a C++ compiler, libturbojpeg and OpenCV (core, imgproc) headers"
fi

command -v pkg-config >/dev/null 2>&1 || give_up "pkg-config not found"
command -v c++ >/dev/null 2>&1 || command -v g++ >/dev/null 2>&1 || give_up "no C++ compiler (g++) found"
pc_has libturbojpeg || give_up "pkg-config does not know libturbojpeg (Debian: libturbojpeg0-dev)"

py_include=$("$PYTHON" -c "import sysconfig; print(sysconfig.get_paths()['include'])" 2>/dev/null || true)
if [[ -z "$py_include" || ! -f "$py_include/Python.h" ]]; then
    give_up "Python.h not found under '$py_include' (Debian system python: apt-get install python3-dev)"
fi

# 3. pkg-config shim for a core+imgproc-only OpenCV ---------------------------------------
SHIM=$(mktemp -d /tmp/ffcv-build-shim.XXXXXX)
trap 'rm -rf "$SHIM"' EXIT
if pc_has opencv4 || pc_has opencv; then
    log "using the system's OpenCV pkg-config file"
else
    cv_inc=""
    for d in /usr/include/opencv4 /usr/local/include/opencv4; do
        [[ -f "$d/opencv2/core.hpp" && -f "$d/opencv2/imgproc.hpp" ]] && { cv_inc=$d; break; }
    done
    [[ -n "$cv_inc" ]] || give_up "OpenCV core/imgproc headers not found (Debian: libopencv-core-dev libopencv-imgproc-dev)"
    mkdir -p "$SHIM/include/opencv2" "$SHIM/pkgconfig"
    printf '/* FFCV build shim: libffcv.cpp only needs core and imgproc. */\n#include <opencv2/core.hpp>\n#include <opencv2/imgproc.hpp>\n' \
        > "$SHIM/include/opencv2/opencv.hpp"
    cat > "$SHIM/pkgconfig/opencv4.pc" <<EOF
Name: opencv4
Description: OpenCV core + imgproc only (temporary shim for building FFCV)
Version: 4
Cflags: -I$SHIM/include -I$cv_inc
Libs: -lopencv_imgproc -lopencv_core
EOF
    export PKG_CONFIG_PATH="$SHIM/pkgconfig${PKG_CONFIG_PATH:+:$PKG_CONFIG_PATH}"
    log "OpenCV from $cv_inc (core + imgproc) via a temporary opencv4.pc in $SHIM"
fi

# 4. pip ------------------------------------------------------------------------------------
"$PYTHON" -m pip --version >/dev/null 2>&1 || give_up "pip is not available for $PYTHON"
CONSTRAINTS="$SHIM/constraints.txt"
"$PYTHON" - > "$CONSTRAINTS" 2>/dev/null <<'EOF'
import importlib.metadata as m
for name in ("numpy", "torch", "torchvision", "opencv-python", "opencv-python-headless"):
    try:
        print(f"{name}=={m.version(name)}")
    except m.PackageNotFoundError:
        pass
EOF
log "pinned during the install: $(tr '\n' ' ' < "$CONSTRAINTS")"
log "$PYTHON -m pip install ffcv==$FFCV_VERSION (compiles libffcv; ~20 s)"
# pillow: ffcv imports PIL but does not declare it.  torch comes in through
# pytorch_pfn_extras when the environment lacks it (then it is the big download).
"$PYTHON" -m pip install --quiet --constraint "$CONSTRAINTS" "ffcv==$FFCV_VERSION" pillow \
    || give_up "pip install ffcv==$FFCV_VERSION failed (compiler output above)"

# 5. check ----------------------------------------------------------------------------------
if ! err=$("$PYTHON" -c "import ffcv, ffcv.libffcv; from ffcv.loader import Loader" 2>&1); then
    give_up "ffcv installed but does not import: $err"
fi
log "ffcv $FFCV_VERSION installed and importable ($(( $(date +%s) - start )) s)"
exit 0
