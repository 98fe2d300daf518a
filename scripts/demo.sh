#!/usr/bin/env bash
# SPDX-License-Identifier: AGPL-3.0-or-later  (runs the tomoscribe Orthanc plugin, see plugin/LICENSE)
#
# tomoscribe demo: `bash scripts/demo.sh start` starts Orthanc with the tomoscribe
# plugin on this machine (data under var/demo/), sends the sample phantom CT study,
# waits for the report and prints it with the OHIF viewer's address of the study
# (served by the plugin at /ohif/); Orthanc keeps running. `stop` stops it.
#
# Environment: TOMOSCRIBE_DEMO_TIMEOUT (seconds to wait for the report, default 900),
# TOMOSCRIBE_DEMO_JOB_FUNCTION (the worker's job function, default operators.app:run_app).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=$ROOT/.venv/bin/python
DEMO=$ROOT/var/demo
PIDFILE=$DEMO/orthanc.pid
SAMPLE=${TOMOSCRIBE_DEMO_SAMPLE:-$ROOT/samples/phantom-ct}
TIMEOUT=${TOMOSCRIBE_DEMO_TIMEOUT:-900}
SCU_AET=TOMODEMO

say() { printf '[demo] %s\n' "$*"; }
die() { printf '[demo] error: %s\n' "$*" >&2; exit 1; }

running_pid() {
    [[ -f $PIDFILE ]] || return 1
    local pid
    pid=$(cat "$PIDFILE")
    [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null && grep -q Orthanc "/proc/$pid/cmdline" 2>/dev/null \
        && echo "$pid"
}

free_port() {  # first free TCP port from $1 upwards (checked on all interfaces)
    "$PY" - "$1" <<'EOF'
import socket, sys
port = int(sys.argv[1])
while port < 65000:
    with socket.socket() as s:
        try:
            s.bind(("0.0.0.0", port))
            break
        except OSError:
            port += 1
print(port)
EOF
}

api() {  # api METHOD PATH [curl args...]: authenticated call to the demo Orthanc
    local method=$1 path=$2
    shift 2
    curl -sS --fail-with-body -u "$USER_NAME:$PASSWORD" -X "$method" "http://127.0.0.1:$HTTP_PORT$path" "$@"
}

load_state() {
    # shellcheck disable=SC1091
    source "$DEMO/state.env"
}

stop() {
    local pid
    if ! pid=$(running_pid); then
        say "the demo Orthanc is not running"
        rm -f "$PIDFILE"
        return 0
    fi
    say "stopping Orthanc (pid $pid); the plugin stops its worker"
    kill -TERM "$pid"
    for _ in $(seq 1 60); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.5
    done
    if kill -0 "$pid" 2>/dev/null; then
        say "Orthanc did not stop in 30 s; killing it"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$PIDFILE"
    say "stopped"
}

start_orthanc() {
    mkdir -p "$DEMO"
    chmod 700 "$DEMO"
    HTTP_PORT=$(free_port 8042)
    DICOM_PORT=$(free_port 4242)
    [[ $HTTP_PORT != "$DICOM_PORT" ]] || DICOM_PORT=$(free_port $((DICOM_PORT + 1)))
    USER_NAME=demo
    PASSWORD=$("$PY" -c 'import secrets; print(secrets.token_urlsafe(16))')
    umask 077
    cat >"$DEMO/state.env" <<EOF
HTTP_PORT=$HTTP_PORT
DICOM_PORT=$DICOM_PORT
USER_NAME=$USER_NAME
PASSWORD=$PASSWORD
EOF
    "$PY" - "$DEMO" "$HTTP_PORT" "$DICOM_PORT" "$USER_NAME" "$PASSWORD" "$ROOT" "$SCU_AET" \
        "${TOMOSCRIBE_DEMO_JOB_FUNCTION:-operators.app:run_app}" <<'EOF'
import json, sys
from pathlib import Path
demo, http_port, dicom_port, user, password, root, scu, job_function = sys.argv[1:]
config = {
    "Name": "tomoscribe-demo",
    "StorageDirectory": f"{demo}/db",
    "IndexDirectory": f"{demo}/db",
    "HttpPort": int(http_port),
    "DicomPort": int(dicom_port),
    "DicomAet": "ORTHANC",
    # Orthanc 1.10 binds all interfaces; these keep strangers out:
    "RemoteAccessAllowed": False,          # HTTP answers loopback clients only
    "AuthenticationEnabled": True,
    "RegisteredUsers": {user: password},
    "DicomAlwaysAllowEcho": False,         # DICOM: only our storescu, from this host
    "DicomAlwaysAllowStore": False,
    "DicomCheckModalityHost": True,
    "DicomModalities": {"demo-scu": [scu, "127.0.0.1", 11112]},
    "StableAge": 3,
    "HttpDescribeErrors": True,
    "Plugins": ["/usr/share/orthanc/plugins/libOrthancPython.so",
                "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"],
    "PythonScript": f"{root}/plugin/tomoscribe_plugin.py",
    "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
    "Tomoscribe": {
        "Python": f"{root}/.venv/bin/python",
        "StorageDirectory": f"{demo}/tomoscribe",
        "Questions": ["Are there any focal findings?", "Which organ has a lesion?", "Is there a lesion in the liver?"],
        "JobFunction": job_function,
    },
}
Path(demo, "orthanc.json").write_text(json.dumps(config, indent=2))
EOF
    umask 022
    say "WARNING: Orthanc 1.10 listens on ALL network interfaces (HTTP $HTTP_PORT, DICOM $DICOM_PORT)."
    say "         HTTP answers loopback clients only (RemoteAccessAllowed false) and needs a password;"
    say "         DICOM accepts only AET $SCU_AET from 127.0.0.1. Use a firewall on shared machines."
    setsid /usr/sbin/Orthanc "$DEMO/orthanc.json" >"$DEMO/orthanc.log" 2>&1 </dev/null &
    echo $! >"$PIDFILE"
    for _ in $(seq 1 120); do
        api GET /system >/dev/null 2>&1 && return 0
        kill -0 "$(cat "$PIDFILE")" 2>/dev/null || { tail -20 "$DEMO/orthanc.log" >&2; die "Orthanc exited; see $DEMO/orthanc.log"; }
        sleep 0.5
    done
    die "Orthanc did not answer in 60 s; see $DEMO/orthanc.log"
}

print_report() {  # print_report ORTHANC_INSTANCE_ID
    api GET "/instances/$1/file" -o "$DEMO/report-sr.dcm"
    "$PY" - "$DEMO/report-sr.dcm" <<'EOF'
import sys
import pydicom
ds = pydicom.dcmread(sys.argv[1])
print(f"  {ds.get('SeriesDescription', 'Structured Report')}  ({ds.Manufacturer})")
def walk(items, depth):
    for item in items:
        name = item.ConceptNameCodeSequence[0].CodeMeaning if "ConceptNameCodeSequence" in item else ""
        vt = item.ValueType
        if vt == "TEXT":
            print(f"{'  ' * depth}{name}: {item.TextValue}")
        elif vt == "CODE":
            print(f"{'  ' * depth}{name}: {item.ConceptCodeSequence[0].CodeMeaning}")
        elif vt == "NUM":
            mv = item.MeasuredValueSequence[0] if "MeasuredValueSequence" in item else None
            unit = mv.MeasurementUnitsCodeSequence[0].CodeValue if mv else ""
            print(f"{'  ' * depth}{name}: {mv.NumericValue if mv else '(no value)'} {unit}")
        elif vt == "CONTAINER":
            print(f"{'  ' * depth}{name}")
        walk(item.get("ContentSequence", []), depth + 1)
print(f"  {ds.ConceptNameCodeSequence[0].CodeMeaning}")
walk(ds.get("ContentSequence", []), 2)
EOF
}

start() {
    command -v storescu >/dev/null || die "storescu missing (Debian package dcmtk); run 'make setup'"
    command -v curl >/dev/null || die "curl missing"
    [[ -x $PY ]] || die "no .venv; run 'make setup'"
    local pid
    if pid=$(running_pid); then
        load_state
        say "the demo Orthanc is already running (pid $pid); sending the sample again"
    else
        start_orthanc
        say "Orthanc started (pid $(cat "$PIDFILE")), data in var/demo/"
    fi
    if [[ ! -d $SAMPLE ]] || ! ls "$SAMPLE" | grep -q .; then
        say "generating the sample study: $SAMPLE"
        "$PY" -m tomoscribe.phantom --seed 9 --out "$SAMPLE"
    fi
    local study_uid
    study_uid=$("$PY" -c '
import sys, pydicom, pathlib
for p in sorted(pathlib.Path(sys.argv[1]).rglob("*")):
    if p.is_file():
        try:
            print(pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID); break
        except Exception:
            pass' "$SAMPLE")
    [[ -n $study_uid ]] || die "no DICOM files in $SAMPLE"
    say "sending $SAMPLE (study $study_uid) with storescu"
    storescu -aet "$SCU_AET" -aec ORTHANC +sd +r -R 127.0.0.1 "$DICOM_PORT" "$SAMPLE"

    local version
    version=$("$PY" -c 'import tomoscribe; print(tomoscribe.__version__)')
    say "waiting for the report of model $version (up to $TIMEOUT s; the study is processed once it is stable)"
    local deadline=$((SECONDS + TIMEOUT)) job="" state="" asked=$((SECONDS + 20))
    while ((SECONDS < deadline)); do
        job=$(api GET /tomoscribe/jobs | "$PY" -c '
import json, sys
jobs = [j for j in json.load(sys.stdin)
        if j["study_uid"] == sys.argv[1] and j["model_version"] == sys.argv[2]]
if jobs:
    j = jobs[0]
    print(j["state"], j["orthanc_study_id"], " ".join(j["outputs"]), "|", j["reason"] or "")' \
            "$study_uid" "$version")
        state=${job%% *}
        [[ $state == done || $state == failed || $state == skipped ]] && break
        if [[ -z $job ]] && ((asked && SECONDS > asked)); then
            # Orthanc ignores instances it already has, so a study sent before (by an
            # earlier demo, with an earlier model) is not "new": ask for a run
            asked=0
            local orthanc_id
            orthanc_id=$(api POST /tools/lookup -d "$study_uid" | "$PY" -c '
import json, sys
print(next((r["ID"] for r in json.load(sys.stdin) if r["Type"] == "Study"), ""))')
            if [[ -n $orthanc_id ]]; then
                say "the study was already in Orthanc with no report of model $version: asking for one"
                api POST "/tomoscribe/studies/$orthanc_id/rerun" -H "X-Requested-With: demo" >/dev/null
            fi
        fi
        if api GET /tomoscribe/health | "$PY" -c 'import json,sys; h=json.load(sys.stdin); sys.exit(0 if h["worker_last_exit"] == 3 else 1)'; then
            tail -5 "$DEMO/tomoscribe/worker.log" >&2
            die "the worker cannot load its job function (see above); Orthanc is still running ('make stop')"
        fi
        sleep 2
    done
    read -r state study_id rest <<<"$job"
    if [[ $state == skipped ]]; then
        say "the model does not read this study: ${job#*| }"
        exit 1
    elif [[ $state == failed ]]; then
        say "the job failed: ${job#*| }"
        say "worker log: $DEMO/tomoscribe/worker.log; Orthanc is still running ('make stop')"
        exit 1
    elif [[ $state != done ]]; then
        say "no report after $TIMEOUT s (job state: ${state:-not queued}); worker log: $DEMO/tomoscribe/worker.log"
        exit 1
    fi
    local sr_id=""
    for id in ${rest%%|*}; do
        # the draft report (series 9901), not the measurement report (9903)
        if [[ $(api GET "/instances/$id/tags?simplify" | "$PY" -c 'import json,sys; t=json.load(sys.stdin); print(t.get("Modality",""), t.get("SeriesNumber",""))') == "SR 9901" ]]; then
            sr_id=$id
        fi
    done
    echo
    say "report (DICOM SR stored in the study):"
    if [[ -n $sr_id ]]; then print_report "$sr_id"; else say "(no SR among the outputs)"; fi
    echo
    say "look at it:"
    local viewer="http://127.0.0.1:$HTTP_PORT/ohif/viewer?StudyInstanceUIDs=$study_uid" answer
    if answer=$(api GET /ohif/app-config.js 2>&1 >/dev/null); then
        say "  OHIF viewer: $viewer"
        say "    (log in with the user and password below; confirm the banner, skip the tour;"
        say "     double-click 'tomoscribe draft report' for the report, 'tomoscribe segmentation'"
        say "     for the segmentation and answer Yes)"
    else
        say "  OHIF viewer: not available (${answer:-no answer}); run 'make setup', then 'make stop' and 'make demo'"
    fi
    say "  Orthanc Explorer: http://127.0.0.1:$HTTP_PORT/app/explorer.html#study?uuid=$study_id"
    say "  user: $USER_NAME   password: $PASSWORD   (also in var/demo/state.env)"
    say "  jobs: curl -u $USER_NAME:$PASSWORD http://127.0.0.1:$HTTP_PORT/tomoscribe/jobs"
    say "  DICOMweb (for a viewer such as OHIF): http://127.0.0.1:$HTTP_PORT/dicom-web/studies/$study_uid/series"
    say "Orthanc keeps running; stop it with: make stop"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
