#!/usr/bin/env bash
# An MDP group loaded and run by hand against a live `modelip emulate`:
# package SqueezeNet in 3 stages, attest cards 3, 4, 5, encrypt with one key
# per partition, `device load -d 3 -d 4 -d 5`, `device exec` the pipeline.
set -euo pipefail
PY=${PYTHON:-python3}
MODEL=$("$PY" -c "import onnx, os; print(os.path.join(os.path.dirname(onnx.__file__), 'backend/test/data/light/light_squeezenet.onnx'))")

. "$(dirname "$0")/common.sh"
start_emulator 6

modelip package "$MODEL" --partitions 3 -o squeeze.qpc
modelip inspect squeeze.qpc > inspect.txt
grep "partition 2: partition_2.qpc" inspect.txt > /dev/null
for d in 3 4 5; do modelip attest "${HOST[@]}" -d $d -o pub$d.dat --trust-root pki/root.pem; done
modelip generate-mek -o MEK.dat
modelip encrypt-model --qpc squeeze.qpc --mek MEK.dat --output-dir enc \
    --pub-keys pub3.dat pub4.dat pub5.dat --trust-root pki/root.pem
modelip device load "${HOST[@]}" --qpc enc/programqpc.bin -d 3 -d 4 -d 5

MODEL="$MODEL" "$PY" - <<'PYEOF'
import os, numpy as np, onnx, onnxruntime
m = onnx.load(os.environ["MODEL"])
inits = {i.name for i in m.graph.initializer}
x = next(v for v in m.graph.input if v.name not in inits)
shape = tuple(d.dim_value for d in x.type.tensor_type.shape.dim)
data = (np.arange(np.prod(shape)).reshape(shape) / np.prod(shape)).astype(np.float32)
np.savez("x.npz", **{x.name: data})
s = onnxruntime.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
np.save("expected.npy", s.run(None, {x.name: data})[0])
PYEOF
modelip device exec "${HOST[@]}" -d 3 -d 4 -d 5 --input x.npz --output y.npz
"$PY" -c "
import numpy as np
y = np.load('y.npz'); e = np.load('expected.npy')
np.testing.assert_allclose(y['softmaxout_1'], e, rtol=1e-3, atol=1e-7)"
echo "MDP FLOW OK"
