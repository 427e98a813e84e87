#!/usr/bin/env bash
# The GPU path, measured in one go (issue 27): on a machine with an NVIDIA GPU this installs what
# it needs, exports the ViT-B-32 image tower as fp16 ONNX and as a TensorRT plan, builds a
# repository for the GPU, serves it, runs perf_analyzer on `classify` from JPEG bytes and on the
# encoder alone, and prints images/s against the targets (H100: 20,000 served from JPEG,
# 45,000 encoder). Every step has a CPU fallback, so the whole script runs (slowly, without
# targets) on a machine without a GPU: that is how it is checked here (tests/unit/test_gpu_check.py).
#
#   benchmarks/gpu_check.sh            # GPU when nvidia-smi sees one, else the CPU fallback
#   benchmarks/gpu_check.sh --cpu      # the CPU fallback even on a GPU machine
#
# Environment (all optional): PYTHON (default: the checkout's .venv, else python3), MODEL
# (ViT-B-32), WORK (build/gpu-check), WHEELS (a folder of wheels to install from without a
# network, e.g. carried to a GPU machine), MEASURE_MS (perf_analyzer window, 5000), BUDGET_S
# (the whole run, 480 = 8 minutes).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WORK="${WORK:-$ROOT/build/gpu-check}"
MODEL="${MODEL:-ViT-B-32}"
MEASURE_MS="${MEASURE_MS:-5000}"
BUDGET_S="${BUDGET_S:-480}"
WHEELS="${WHEELS:-$ROOT/build/wheels}"
START=$(date +%s)
FORCE_CPU=0
[[ "${1:-}" == "--cpu" ]] && FORCE_CPU=1

exec 3>&1  # the progress lines reach the terminal even from a step whose output goes to a log
say() { printf '[gpu_check %3ss] %s\n' "$(( $(date +%s) - START ))" "$*" >&3; }
left() { echo $(( BUDGET_S - ($(date +%s) - START) )); }
step() {  # step NAME COMMAND...: runs COMMAND within what is left of the budget
  local name="$1"; shift
  local remaining; remaining=$(left)
  if (( remaining <= 5 )); then say "out of time before: $name"; exit 3; fi
  say "$name"
  timeout "$remaining" "$@"
}

# -- 0. where are we -------------------------------------------------------------------------
if [[ $FORCE_CPU == 0 ]] && command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
  DEVICE=cuda; PRECISION="${PRECISION:-fp16}"; BATCH=256; CONCURRENCY=8
  GPU_NAME="$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)"
  case "$GPU_NAME" in *H100*|*H200*) TARGET_SERVED=20000; TARGET_ENCODER=45000 ;; *) TARGET_SERVED=0; TARGET_ENCODER=0 ;; esac
else
  DEVICE=cpu; PRECISION="${PRECISION:-fp32}"; BATCH=8; CONCURRENCY=2
  GPU_NAME="none (CPU fallback)"; TARGET_SERVED=0; TARGET_ENCODER=0
fi
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON="$(command -v python3)"; fi
fi
mkdir -p "$WORK"
say "device $DEVICE ($GPU_NAME), model $MODEL $PRECISION, python $PYTHON, work $WORK"

# -- 1. install what is missing ----------------------------------------------------------------
have() { "$PYTHON" -c "import $1" >/dev/null 2>&1; }
if ! have headmaster.server.triton || ! have tritonclient.grpc || ! have pytriton; then
  SITE="$WORK/site"; mkdir -p "$SITE"
  if compgen -G "$WHEELS/*.whl" >/dev/null; then  # no network (the lent GPU machines): carried wheels
    step "install from $WHEELS" "$PYTHON" -m pip install -q --no-deps --no-index --target "$SITE" "$WHEELS"/*.whl
  else
    step "install from the package index" "$PYTHON" -m pip install -q --target "$SITE" \
      -c "$ROOT/constraints.txt" "tritonclient[all]==2.51.0" nvidia-pytriton==0.7.0 open_clip_torch onnx
  fi
  step "install headmaster" "$PYTHON" -m pip install -q --no-deps --no-build-isolation --target "$SITE" "$ROOT"
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  export PATH="$SITE/bin:$PATH"
fi
if [[ $DEVICE == cuda ]] && ! have tensorrt; then
  "$PYTHON" -m pip install -q --target "$WORK/site" tensorrt-cu12 >/dev/null 2>&1 \
    && export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}" || say "tensorrt not installable here: no plan"
fi
HM=("$PYTHON" -m headmaster.cli)

# -- 2. export: fp16 ONNX (the served tower), a TensorRT plan beside it --------------------------
ENCODER="$WORK/encoder-$PRECISION"
rm -rf "$ENCODER" "$WORK/encoder-plan"
step "export $MODEL $PRECISION ONNX" "${HM[@]}" export encoder --model "$MODEL" --pretrained none \
  --precision "$PRECISION" --towers image --out "$ENCODER" >"$WORK/export.log" 2>&1 \
  || { cat "$WORK/export.log"; exit 1; }
PLAN="skipped"
if [[ $DEVICE == cuda ]] && have tensorrt; then
  if step "export the TensorRT plan" "${HM[@]}" export encoder --model "$MODEL" --pretrained none --precision fp16 \
      --format plan --towers image --max-batch-size 1024 --opt-batch-size 256 --out "$WORK/encoder-plan" \
      >"$WORK/plan.log" 2>&1; then PLAN="$WORK/encoder-plan"; else PLAN="failed (see $WORK/plan.log)"; fi
elif [[ $DEVICE == cuda ]]; then
  PLAN="skipped: no tensorrt"
else
  PLAN="skipped: no GPU"
fi
say "plan: $PLAN"
SERVED="$ENCODER"
if [[ $DEVICE == cuda ]] && ! "$PYTHON" -c "import onnxruntime as o, sys; sys.exit('CUDAExecutionProvider' not in o.get_available_providers())" 2>/dev/null; then
  # onnxruntime without its CUDA provider (the lent machines): the same tower as TorchScript fp16 serves on the GPU
  SERVED="$WORK/encoder-torchscript"; rm -rf "$SERVED"
  step "export $MODEL $PRECISION TorchScript (onnxruntime has no CUDA provider here)" "${HM[@]}" export encoder \
    --model "$MODEL" --pretrained none --precision "$PRECISION" --format torchscript --towers image --out "$SERVED" \
    >"$WORK/torchscript.log" 2>&1 || { cat "$WORK/torchscript.log"; exit 1; }
fi

# -- 3. build (no caches: perf_analyzer repeats its images) ------------------------------------
REPO="$WORK/model_repository"
rm -rf "$REPO"
step "build the repository" "${HM[@]}" repo build --encoder "$SERVED" --repo "$REPO" --device "$DEVICE" \
  --embedding-cache-mb 0 --decoded-cache-mb 0 >"$WORK/build.log" 2>&1 || { cat "$WORK/build.log"; exit 1; }

# -- 4. serve --------------------------------------------------------------------------------------
PORTS=($("$PYTHON" -c "
from headmaster.server.triton import free_port
print(*(free_port() for _ in range(3)))"))
"${HM[@]}" serve --repo "$REPO" --http-port "${PORTS[0]}" --grpc-port "${PORTS[1]}" \
  --metrics-port "${PORTS[2]}" --open-control-api >"$WORK/serve.log" 2>&1 &
SERVE=$!
trap 'kill -TERM $SERVE 2>/dev/null; wait $SERVE 2>/dev/null || true' EXIT
say "serve (pid $SERVE), waiting for ready"
until grep -q "Triton is ready" "$WORK/serve.log"; do
  if ! kill -0 $SERVE 2>/dev/null; then cat "$WORK/serve.log"; say "serve exited"; exit 1; fi
  if (( $(left) <= 5 )); then say "out of time waiting for serve"; exit 3; fi
  sleep 1
done

# -- 5. measure: perf_analyzer (or, without it, the Python client) ------------------------------
export HTTP_URL="127.0.0.1:${PORTS[0]}" GRPC_URL="127.0.0.1:${PORTS[1]}" BATCH CONCURRENCY MEASURE_MS \
  TARGET_SERVED TARGET_ENCODER WORK ENCODER="$SERVED" PLAN
step "measure" "$PYTHON" - <<'PY'
import io, json, os, struct, base64, time
from pathlib import Path
import numpy as np
from PIL import Image
from headmaster.export.card import EncoderCard
from headmaster.server import perf_analyzer
from headmaster.served.preprocess import preprocess_bytes

work, batch, conc = Path(os.environ["WORK"]), int(os.environ["BATCH"]), int(os.environ["CONCURRENCY"])
ms = int(os.environ["MEASURE_MS"])
rng = np.random.default_rng(0)
jpegs = []
for _ in range(32):  # 500x375 photo-like JPEGs: smooth noise, quality 90
    small = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(small).resize((500, 375), Image.BICUBIC).save(buffer, "JPEG", quality=90)
    jpegs.append(buffer.getvalue())
card = EncoderCard.load(os.environ["ENCODER"])
tower = card.towers["image"]
pixels = preprocess_bytes(jpegs[0], card.preprocessing)
figures = {}
from concurrent.futures import ThreadPoolExecutor
import tritonclient.grpc as grpcclient
from headmaster.client import HeadmasterClient
from headmaster.errors import ToolError

def rate(work_one, seconds=ms / 1000):
    """Images/s of ``conc`` threads calling work_one (it returns the images it did) for ``seconds``."""
    stop, done = time.monotonic() + seconds, []
    def loop(_):
        n = 0
        while time.monotonic() < stop:
            n += work_one()
        done.append(n)
    start = time.monotonic()
    with ThreadPoolExecutor(conc) as pool:
        list(pool.map(loop, range(conc)))
    return sum(done) / (time.monotonic() - start)

def by_client_classify():
    client = HeadmasterClient(os.environ["GRPC_URL"], batch_size=batch)
    chunk = [jpegs[i % len(jpegs)] for i in range(batch)]
    return rate(lambda: sum(r.ok for r in client.classify(chunk)))

def by_client_encoder():
    raw = grpcclient.InferenceServerClient(os.environ["GRPC_URL"])
    x = np.repeat(pixels[None], batch, axis=0).astype(np.uint8 if tower.input_dtype == "UINT8" else np.float32)
    def encode():
        tensor = grpcclient.InferInput(tower.input_name, list(x.shape), tower.input_dtype)
        tensor.set_data_from_numpy(x)
        raw.infer("image_encoder", [tensor])
        return batch
    return rate(encode)

encoder_data = work / "pixels_input.json"
encoder_data.write_text(json.dumps({"data": [{tower.input_name: {
    "b64": base64.b64encode(pixels.tobytes()).decode(), "shape": list(pixels.shape)}}]}))
jpeg_data = perf_analyzer.write_image_input(jpegs, work / "jpeg_input.json")
reason = perf_analyzer.unavailable_reason()
for what, model, data, fallback in (("classify from JPEG", "classify", jpeg_data, by_client_classify),
                                    ("image_encoder alone", "image_encoder", encoder_data, by_client_encoder)):
    if reason is None:
        try:
            figures[what] = perf_analyzer.run(model, os.environ["GRPC_URL"], data, protocol="grpc", batch_size=batch,
                                              concurrency=conc, measurement_ms=ms).throughput
            continue
        except ToolError as e:  # e.g. no stable window on a busy machine
            print(f"perf_analyzer on {model}: {str(e).splitlines()[-1][:120]}; measuring with the Python client")
    else:
        print(f"perf_analyzer unavailable ({reason}); measuring {model} with the Python client")
    figures[what + " (Python client)"] = fallback()
if os.environ["PLAN"].startswith("/"):  # the plan alone, through TensorRT's runtime (the native container serves it)
    try:
        import tensorrt as trt, torch
        engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(
            (Path(os.environ["PLAN"]) / EncoderCard.load(os.environ["PLAN"]).towers["image"].file).read_bytes())
        context = engine.create_execution_context()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        b = 512
        buffers = {}
        for name in names:
            if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                context.set_input_shape(name, (b, *pixels.shape))
        for name in names:
            shape = tuple(context.get_tensor_shape(name))
            dtype = {trt.uint8: torch.uint8, trt.float16: torch.float16}.get(engine.get_tensor_dtype(name), torch.float32)
            buffers[name] = torch.zeros(shape, dtype=dtype, device="cuda")
            context.set_tensor_address(name, buffers[name].data_ptr())
        stream = torch.cuda.Stream()
        for _ in range(5):
            context.execute_async_v3(stream.cuda_stream)
        stream.synchronize()
        start, n = time.perf_counter(), 0
        while time.perf_counter() - start < ms / 1000:
            context.execute_async_v3(stream.cuda_stream); n += b
        stream.synchronize()
        figures["TensorRT plan alone (batch 512)"] = n / (time.perf_counter() - start)
    except Exception as e:
        print(f"plan not measured: {type(e).__name__}: {e}")
targets = {"classify from JPEG": int(os.environ["TARGET_SERVED"]), "image_encoder alone": int(os.environ["TARGET_ENCODER"]),
           "classify from JPEG (Python client)": int(os.environ["TARGET_SERVED"]),
           "image_encoder alone (Python client)": int(os.environ["TARGET_ENCODER"]),
           "TensorRT plan alone (batch 512)": int(os.environ["TARGET_ENCODER"])}
print(f"\n| what | img/s | target | |\n|---|---|---|---|")
for what, value in figures.items():
    target = targets.get(what, 0)
    verdict = ("met" if value >= target else "MISSED") if target else "no target (not an H100/H200)"
    print(f"| {what} (batch {batch}, concurrency {conc}) | {value:,.1f} | {target or '-'} | {verdict} |")
PY
say "done in $(( $(date +%s) - START )) s (budget $BUDGET_S s)"
