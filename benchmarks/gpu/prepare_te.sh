#!/usr/bin/env bash
# Fetch (on a machine with pip access) what benchmarks/gpu/install_te.sh needs on the offline
# GPU machine, into the git-ignored folders .te/ and .whl/ of the repository root.
#     bash benchmarks/gpu/prepare_te.sh        # then carry [".te", ".whl"] with the `run` call
# - transformer-engine 2.20.2 (pure Python) and transformer-engine-cu13 2.20.2 (core library;
#   276 MB, slimmed to its sm_90 cubins by slim_te_core.py: 32 MB, one call can carry it)
# - transformer-engine-torch 2.20.2: an sdist only. `pip download` of it runs its setup.py to
#   prepare metadata, which fails without a CUDA torch, so the .tar.gz is fetched by the URL
#   that PyPI's simple index (JSON) gives, and its sha256 checked.
# - pydantic (imported by transformer_engine.common.recipe) and its deps, which the GPU image
#   lacks, as cp312 manylinux wheels.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
PY=${PY:-python3}
excl=$(git rev-parse --git-path info/exclude); mkdir -p "$(dirname "$excl")"
for d in /.te/ /.whl/; do grep -qxF "$d" "$excl" 2>/dev/null || echo "$d" >>"$excl"; done
mkdir -p .te .whl
PLAT=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
      --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
      --platform manylinux1_x86_64)
tmp=$(mktemp -d)
$PY -m pip download -q --no-deps "${PLAT[@]}" -d .te transformer-engine==2.20.2
$PY -m pip download -q --no-deps "${PLAT[@]}" -d "$tmp" transformer-engine-cu13==2.20.2
$PY "$(dirname "$0")/slim_te_core.py" "$tmp"/transformer_engine_cu13-2.20.2-*.whl \
    .te/transformer_engine_cu13-2.20.2-py3-none-manylinux_2_28_x86_64.whl
rm -rf "$tmp"
url_sha=$(curl -fsS -H 'Accept: application/vnd.pypi.simple.v1+json' \
  https://pypi.org/simple/transformer-engine-torch/ | $PY -c '
import json, sys
for f in json.load(sys.stdin)["files"]:
    if f["filename"] == "transformer_engine_torch-2.20.2.tar.gz":
        print(f["url"], f["hashes"]["sha256"])')
set -- $url_sha
curl -fsSL -o .te/transformer_engine_torch-2.20.2.tar.gz "$1"
echo "$2  .te/transformer_engine_torch-2.20.2.tar.gz" | sha256sum -c -
$PY -m pip download -q --no-deps "${PLAT[@]}" -d .whl pydantic==2.14.3 pydantic-core==2.50.4 \
    annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0
du -sh .te .whl
