#!/usr/bin/env bash
# The reference manual flow against a live `modelip emulate`, step by step:
# attest 4 cards -> encrypt-model with 4 evidence files -> stage + load on 4
# cards -> execute -> reset one card -> its load fails -> attest again ->
# wrap-mek -> replace-mek -> load works again. Run in an empty directory;
# $PYTHON is the interpreter with modelip installed.
set -euo pipefail
PY=${PYTHON:-python3}

. "$(dirname "$0")/common.sh"
start_emulator 4 --reboot-time 0.1
write_tiny_model
modelip pack -o model.qpc --segment network.onnx=network.onnx --segment io_desc.json=io_desc.json
modelip generate-mek -o MEK.dat

for d in 0 1 2 3; do
    modelip attest "${HOST[@]}" -d $d -o pub$d.dat --trust-root pki/root.pem
done
modelip encrypt-model --qpc model.qpc --mek MEK.dat --output-dir enc \
    --pub-keys pub0.dat pub1.dat pub2.dat pub3.dat --trust-root pki/root.pem

for d in 0 1 2 3; do
    modelip device load "${HOST[@]}" -d $d --qpc enc/programqpc.bin
done
modelip device exec "${HOST[@]}" -d 2 --input x.npy --output y.npy
"$PY" -c "import numpy as np; np.testing.assert_allclose(np.load('y.npy'), np.load('expected.npy'), rtol=1e-5)"

modelip device reset "${HOST[@]}" -d 2
sleep 0.3
if modelip device load "${HOST[@]}" -d 2 --qpc enc/programqpc.bin 2>err.txt; then
    echo "a reset card must refuse its stale slot" >&2; exit 1
fi
grep -q "earlier session" err.txt

modelip attest "${HOST[@]}" -d 2 -o pub2-new.dat --trust-root pki/root.pem
modelip wrap-mek --mek MEK.dat --encrypted-qpc enc --pub-keys pub0.dat pub1.dat pub2-new.dat pub3.dat \
    --trust-root pki/root.pem --output-dir wrapped
modelip replace-mek --encrypted-qpc enc --wrapped-meks wrapped/slot_2 --in-place
modelip device load "${HOST[@]}" -d 2 --qpc enc/programqpc.bin
modelip device exec "${HOST[@]}" -d 2 --input x.npy --output y2.npy
"$PY" -c "import numpy as np; np.testing.assert_allclose(np.load('y2.npy'), np.load('expected.npy'), rtol=1e-5)"
modelip device list "${HOST[@]}"
echo "REFERENCE FLOW OK"
