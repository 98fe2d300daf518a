# tomoscribe: Orthanc + DICOMweb + the tomoscribe plugin and worker, one image.
#
#   docker build -t tomoscribe .
#   docker run -p 8042:8042 -p 4242:4242 -v tomoscribe-db:/var/lib/orthanc/db \
#       -e ORTHANC_ADMIN_PASSWORD=change-me tomoscribe
#
# The image runs on the CPU. torch is pinned to 2.13.0; on PyPI that version is
# a CUDA build of several GB. To get the small CPU build, pass a package index
# that serves it: --build-arg PIP_EXTRA_INDEX_URL=<index>.
FROM debian:12-slim

ARG PIP_EXTRA_INDEX_URL=""
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_EXTRA_INDEX_URL=${PIP_EXTRA_INDEX_URL} \
    PIP_NO_CACHE_DIR=1

RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        orthanc orthanc-python orthanc-dicomweb dcmtk dicom3tools \
        python3.11 python3.11-venv make ca-certificates iproute2 \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/tomoscribe
COPY pyproject.toml constraints.txt README.md Makefile app.yaml ./
COPY scripts/ scripts/
COPY tomoscribe/ tomoscribe/
COPY operators/ operators/
COPY plugin/ plugin/
COPY samples/ samples/
COPY docker/ docker/
RUN bash scripts/setup.sh

# Orthanc's data and the job database live on a volume: a restart loses nothing.
VOLUME ["/var/lib/orthanc/db"]
EXPOSE 8042 4242
ENTRYPOINT ["/opt/tomoscribe/docker/entrypoint.sh"]
