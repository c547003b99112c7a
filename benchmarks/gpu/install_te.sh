#!/usr/bin/env bash
# Install NVIDIA Transformer Engine 2.20.2 for PyTorch on the lent GPU machine, offline.
#
# Run from the repository root on the device (the `run` tool), with `.te` and `.whl` carried:
#     bash benchmarks/gpu/install_te.sh && export PYTHONPATH=/tmp/site
# Inputs (made here by benchmarks/gpu/prepare_te.sh; git-ignored, never committed):
#   .te/transformer_engine-2.20.2-py3-none-any.whl          TE's Python package
#   .te/transformer_engine_cu13-2.20.2-py3-none-manylinux_2_28_x86_64.whl
#        TE's core library, slimmed to sm_90 cubins by slim_te_core.py (32 MB instead of 276 MB);
#        or, for an unslimmed wheel carried in pieces over several calls, its parts in
#        $TE_PARTS (default /tmp/te_parts, core.whl.part-*), joined here
#   .te/transformer_engine_torch-2.20.2-cp312-*.whl   a torch extension built by an earlier run
#        (then nothing is compiled), else
#   .te/transformer_engine_torch-2.20.2.tar.gz        the sdist, compiled here against the
#        machine's torch (a C++-only extension: g++, no nvcc kernels; about 3-5 minutes)
#   .whl/*.whl   Python deps missing on the image: pydantic, pydantic-core, annotated-types,
#        typing-inspection, typing-extensions
# Output: everything in $TE_SITE (default /tmp/site); logs and the built extension wheel in
# $OUT (when set) so that later sessions can skip the compile.
# Environment of the build (see the sdist's build_tools): NVTE_FRAMEWORK=pytorch,
# NVTE_PYTORCH_FORCE_BUILD=TRUE (no download attempt from GitHub), NVTE_NO_LOCAL_VERSION=1 (no
# "+git" suffix: TE refuses mismatched versions of its three packages), NVTE_WITH_NCCL_EP=0
# (the NCCL expert-parallel bindings are not needed), MAX_JOBS; cudnn.h and nccl.h come from the
# pip packages nvidia-cudnn-cu13 / nvidia-nccl-cu13 through CPLUS_INCLUDE_PATH.
set -euo pipefail
SITE=${TE_SITE:-/tmp/site}
SRC=${TE_SRC:-.te}
DEPS=${TE_DEPS:-.whl}
PARTS=${TE_PARTS:-/tmp/te_parts}
LOGDIR=${OUT:-/tmp/te_logs}
BUILD=/tmp/te_build
VER=2.20.2
mkdir -p "$LOGDIR" "$BUILD"
PY=python3
t_start=$(date +%s)

smoke() {
  PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" $PY - <<'EOF'
import torch  # first: its CUDA libraries (nccl, cublas) satisfy libtransformer_engine.so's NEEDED
import transformer_engine, transformer_engine.pytorch as te, transformer_engine_torch as tex
from transformer_engine.pytorch.tensor.float8_blockwise_tensor import Float8BlockQuantizer
print("TE", transformer_engine.__version__, "from", transformer_engine.__file__)
print("torch", torch.__version__, torch.cuda.get_device_name(0), "cudnn", tex.get_cudnn_version())
q = Float8BlockQuantizer(fp8_dtype=tex.DType.kFloat8E4M3, rowwise=True, columnwise=False,
                         force_pow_2_scales=True, amax_epsilon=0.0, block_scaling_dim=2)
x = torch.randn(256, 384, device="cuda", dtype=torch.bfloat16)
qt = q(x)
err = float((qt.dequantize(dtype=torch.float32) - x.float()).norm() / x.float().norm())
print("Float8BlockQuantizer:", type(qt).__name__, tuple(qt._rowwise_data.shape),
      tuple(qt._rowwise_scale_inv.shape), "rel err", round(err, 4))
assert err < 0.05
try:  # a GEMM through TE with the 128x128 block recipe exercises more of the sm_90 cubins
    from transformer_engine.common.recipe import Float8BlockScaling
    lin = te.Linear(512, 256, bias=False, params_dtype=torch.bfloat16).cuda()
    inp = torch.randn(128, 512, device="cuda", dtype=torch.bfloat16)
    with te.autocast(enabled=True, recipe=Float8BlockScaling()):
        y = lin(inp)
    ref = inp @ lin.weight.t()
    print("te.Linear fp8-block rel err", round(float((y - ref).float().norm() / ref.float().norm()), 4))
except Exception as e:  # informative only
    print("te.Linear fp8-block: FAILED", type(e).__name__, str(e).splitlines()[0][:300])
EOF
}

if [ -f "$SITE/.te_installed" ] && smoke >"$LOGDIR/te_smoke.log" 2>&1; then
  echo "TE already installed in $SITE"; cat "$LOGDIR/te_smoke.log"; exit 0
fi

echo "== machine"; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
$PY -c "import torch, sys; print(sys.version.split()[0], torch.__version__, torch.version.cuda)"
which nvcc g++ || true; nvcc --version | tail -2 || true

# 1. the core wheel
core=$(ls "$SRC"/transformer_engine_cu13-$VER-*.whl 2>/dev/null | head -1 || true)
if [ -z "$core" ]; then
  ls "$PARTS"/core.whl.part-* >/dev/null
  core=$BUILD/transformer_engine_cu13-$VER-py3-none-manylinux_2_28_x86_64.whl
  cat "$PARTS"/core.whl.part-* >"$core"
  if [ -f "$SRC/core.whl.sha256" ]; then echo "$(cat "$SRC/core.whl.sha256")  $core" | sha256sum -c -; fi
fi
echo "core wheel: $core ($(du -h "$core" | cut -f1))"

# 2. the torch extension: prebuilt, or compiled from the sdist
ext=$(ls "$SRC"/transformer_engine_torch-$VER-cp312-*.whl 2>/dev/null | head -1 || true)
if [ -z "$ext" ]; then
  rm -rf "$BUILD/src" "$BUILD/dist"; mkdir -p "$BUILD/src"
  tar xzf "$SRC/transformer_engine_torch-$VER.tar.gz" -C "$BUILD/src"
  inc=$($PY - <<'EOF'
import glob, os, sys
dirs = []
for root in sys.path:
    base = os.path.join(root, "nvidia")
    if not root or not os.path.isdir(base):
        continue
    for header in ("cudnn.h", "nccl.h", "cublasLt.h", "nvrtc.h"):
        for f in sorted(glob.glob(os.path.join(base, "**", "include", header), recursive=True)):
            if os.path.dirname(f) not in dirs:
                dirs.append(os.path.dirname(f))
print(":".join(dirs))
EOF
)
  echo "extra include dirs: $inc"
  t0=$(date +%s)
  (
    cd "$BUILD/src/transformer_engine_torch-$VER"
    export NVTE_FRAMEWORK=pytorch NVTE_PYTORCH_FORCE_BUILD=TRUE NVTE_NO_LOCAL_VERSION=1 \
           NVTE_WITH_NCCL_EP=0 NVTE_CUDA_ARCHS=90 MAX_JOBS=${MAX_JOBS:-$(nproc)} \
           CPLUS_INCLUDE_PATH="$inc${CPLUS_INCLUDE_PATH:+:$CPLUS_INCLUDE_PATH}"
    $PY -m pip wheel -v --no-deps --no-build-isolation --no-index -w "$BUILD/dist" .
  ) >"$LOGDIR/te_build.log" 2>&1 || { echo "BUILD FAILED; last lines of $LOGDIR/te_build.log:"; grep -n -m 20 -E "error|Error" "$LOGDIR/te_build.log" | head -20; tail -40 "$LOGDIR/te_build.log"; exit 1; }
  echo "built the torch extension in $(( $(date +%s) - t0 )) s"
  ext=$(ls "$BUILD"/dist/transformer_engine_torch-$VER-*.whl | head -1)
  if [ -n "${OUT:-}" ]; then cp "$ext" "$OUT/"; fi
fi
echo "torch extension wheel: $ext ($(du -h "$ext" | cut -f1))"

# 3. one pip call for everything (so the three TE packages merge into one transformer_engine/)
rm -rf "$SITE"
$PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" \
    "$SRC/transformer_engine-$VER-py3-none-any.whl" "$core" "$ext" "$DEPS"/*.whl
ls "$SITE/transformer_engine/wheel_lib"

# 4. smoke test
smoke 2>&1 | tee "$LOGDIR/te_smoke.log"
touch "$SITE/.te_installed"
echo "TE installed in $SITE in $(( $(date +%s) - t_start )) s; use: export PYTHONPATH=$SITE"
