# Sourced by the flows. $PY is the interpreter with modelip installed.

# A live `modelip emulate` of one host with $1 cards (more flags may follow), its
# vendor root in pki/, stopped when the flow exits; sets PORT and HOST.
start_emulator() {
    local devices=$1; shift
    modelip emulate --hosts 1 --devices-per-host "$devices" --base-port 0 --pki-dir pki "$@" \
        > emulate.log 2>&1 &
    EMU=$!
    trap 'kill -INT $EMU 2>/dev/null; wait $EMU 2>/dev/null || true' EXIT
    for _ in $(seq 100); do grep -q READY emulate.log && break; sleep 0.1; done
    grep -q READY emulate.log
    PORT=$(sed -n 's/^host0 listening on 127.0.0.1:\([0-9]*\).*/\1/p' emulate.log)
    HOST=(--ip 127.0.0.1 --port "$PORT")
}

# The tiny model as segment files (network.onnx, io_desc.json), an input (x.npy) and
# onnxruntime's output for it (expected.npy).
write_tiny_model() {
    "$PY" - <<'PYEOF'
import json, numpy as np
from tests.models import tiny_mlp, reference_output
m = tiny_mlp()
open("network.onnx", "wb").write(m.SerializeToString())
json.dump({"format": "modelip-io/1", "inputs": [{"name": "x", "dtype": "float32", "shape": [1, 8]}],
           "outputs": [{"name": "y", "dtype": "float32", "shape": [1, 4]}],
           "model_outputs": ["y"]}, open("io_desc.json", "w"))
x = np.random.default_rng(5).standard_normal((1, 8)).astype(np.float32)
np.save("x.npy", x)
np.save("expected.npy", reference_output(m, x))
PYEOF
}
