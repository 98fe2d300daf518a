#!/usr/bin/env bash
# Install everything tomoscribe needs, idempotently: Debian packages (only the
# missing ones), the venv .venv from /usr/bin/python3.11 (the interpreter
# Orthanc's python plugin embeds), torch==2.13.0 first (an unpinned torch
# pulls a multi-GB CUDA build), then the project with pinned versions
# (constraints.txt). A stamp file makes a second run a no-op.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

log() { printf '[setup] %s\n' "$*" >&2; }

# --- Debian packages -------------------------------------------------------
need_pkgs=()
for pkg in orthanc orthanc-python orthanc-dicomweb dcmtk dicom3tools python3.11-venv iproute2 util-linux; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need_pkgs+=("$pkg")
done
if ((${#need_pkgs[@]})); then
    if [[ $(id -u) -ne 0 ]]; then
        log "missing Debian packages: ${need_pkgs[*]} (run as root, or: sudo apt-get install ${need_pkgs[*]})"
        exit 1
    fi
    log "installing Debian packages: ${need_pkgs[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >/dev/null
    # Debian starts a system Orthanc on install when it can; ours are started by hand.
    if command -v service >/dev/null && service orthanc status >/dev/null 2>&1; then
        service orthanc stop >/dev/null 2>&1 || true
    fi
fi

# --- Python environment ----------------------------------------------------
if [[ ! -x .venv/bin/python ]]; then
    log "creating .venv with /usr/bin/python3.11"
    /usr/bin/python3.11 -m venv .venv
fi
stamp=.venv/.tomoscribe-installed
want=$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)
if [[ -f $stamp && $(cat "$stamp") == "$want" ]] && .venv/bin/python -c "import tomoscribe" 2>/dev/null; then
    exit 0
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
log "installing torch==2.13.0 (CPU build where one is available locally)"
.venv/bin/pip install -q "torch==2.13.0"
log "installing tomoscribe and its pinned dependencies"
.venv/bin/pip install -q -c constraints.txt -e ".[dev]"
echo "$want" >"$stamp"
log "done"
