#!/bin/sh
# Write Orthanc's configuration from the environment, then run Orthanc in the
# foreground. ORTHANC_ADMIN_PASSWORD is required: tomoscribe's routes and the
# DICOMweb API are behind Orthanc's authentication.
set -eu
: "${ORTHANC_ADMIN_PASSWORD:?set ORTHANC_ADMIN_PASSWORD}"
mkdir -p /var/lib/orthanc/db /etc/tomoscribe
/opt/tomoscribe/.venv/bin/python - <<'PY'
import json, os
conf = json.load(open("/opt/tomoscribe/docker/orthanc.json"))
conf["RegisteredUsers"] = {"admin": os.environ["ORTHANC_ADMIN_PASSWORD"]}
conf["DicomAet"] = os.environ.get("ORTHANC_AET", conf["DicomAet"])
json.dump(conf, open("/etc/tomoscribe/orthanc.json", "w"), indent=2)
PY
exec /usr/sbin/Orthanc /etc/tomoscribe/orthanc.json
