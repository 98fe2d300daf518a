#!/usr/bin/env bash
# Install everything tomoscribe needs, idempotently: Debian packages (only the
# missing ones), the pinned OHIF viewer build (var/ohif/, see below), the venv .venv from /usr/bin/python3.11 (the interpreter
# Orthanc's python plugin embeds), torch==2.13.0 first (an unpinned torch
# pulls a multi-GB CUDA build), then the project with pinned versions
# (constraints.txt). A stamp file makes a second run a no-op.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

log() { printf '[setup] %s\n' "$*" >&2; }

# --- Debian packages -------------------------------------------------------
need_pkgs=()
# chromium + chromium-driver: the viewer's browser test (tests/test_ohif_browser.py)
for pkg in orthanc orthanc-python orthanc-dicomweb dcmtk dicom3tools python3.11-venv iproute2 util-linux \
           curl chromium chromium-driver; do
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

# --- OHIF viewer (served by the plugin at /ohif/, see plugin/ohif.py) --------
# The built site of the npm package @ohif/app, pinned here (version + the registry's
# sha512 integrity), unpacked into var/ohif/app-$OHIF_VERSION/; var/ohif/dist points
# at its dist/ folder. Fetched with `npm pack` when npm is there, else with curl from
# the same registry; either way the archive must match the pinned hash.
OHIF_VERSION=3.13.2
OHIF_INTEGRITY=sha512-WZdxmpmG7rqFgW9ZJLcbgr3XCtLi1KDNPoMaeY5PPe6j4G4fjEjjkycZM6C6Zk2F87BKxFfpq+jd5xXZB9E8EA==
ohif_dir=var/ohif/app-$OHIF_VERSION
if [[ ! -f $ohif_dir/.complete || "$(readlink var/ohif/dist)" != "app-$OHIF_VERSION/package/dist" ]]; then
    log "fetching the OHIF viewer (@ohif/app@$OHIF_VERSION, about 50 MB)"
    mkdir -p var/ohif
    rm -rf "$ohif_dir" var/ohif/download
    mkdir -p var/ohif/download
    tgz=var/ohif/download/ohif-app-$OHIF_VERSION.tgz
    if command -v npm >/dev/null; then
        (cd var/ohif/download && npm pack --silent "@ohif/app@$OHIF_VERSION" >/dev/null)
    else
        registry=${NPM_CONFIG_REGISTRY:-https://registry.npmjs.org}
        curl -fsSL --retry 3 -o "$tgz" "${registry%/}/@ohif/app/-/app-$OHIF_VERSION.tgz"
    fi
    got=$(/usr/bin/python3.11 -c 'import base64, hashlib, sys
print("sha512-" + base64.b64encode(hashlib.sha512(open(sys.argv[1], "rb").read()).digest()).decode())' "$tgz")
    if [[ $got != "$OHIF_INTEGRITY" ]]; then
        log "the @ohif/app@$OHIF_VERSION archive does not match its pinned hash (got $got)"
        exit 1
    fi
    mkdir -p "$ohif_dir"
    tar -xzf "$tgz" -C "$ohif_dir" --no-same-owner
    [[ -f $ohif_dir/package/dist/index.html ]] || { log "no dist/index.html in @ohif/app@$OHIF_VERSION"; exit 1; }
    ln -sfn "app-$OHIF_VERSION/package/dist" var/ohif/dist
    rm -rf var/ohif/download
    touch "$ohif_dir/.complete"
    for old in var/ohif/app-*; do  # earlier pins
        [[ $old == "$ohif_dir" ]] || rm -rf "$old"
    done
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
