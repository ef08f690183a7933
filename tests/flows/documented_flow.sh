#!/usr/bin/env bash
# The reference tool's documented commands with exactly their flags (no
# --trust-root, no --encrypted-qpc), after the one-time set-up of the vendor root
# (copied to the per-user configuration file), against a live `modelip emulate`:
# encrypt-model, attest, wrap-mek, encrypt-with-session-keys, replace-mek after a
# reset, and the single-command encrypt-model with --pub-keys. Run in an empty
# directory; $PYTHON is the interpreter with modelip installed.
set -euo pipefail
PY=${PYTHON:-python3}
export XDG_CONFIG_HOME="$PWD/config"
unset MODELIP_TRUST_ROOT

. "$(dirname "$0")/common.sh"
start_emulator 2 --reboot-time 0.1

# one-time set-up: the vendor root, configured once
mkdir -p config/modelip && cp pki/root.pem config/modelip/trust-root.pem

write_tiny_model
modelip pack -o model.qpc --segment network.onnx=network.onnx --segment io_desc.json=io_desc.json
modelip generate-mek -o MEK.dat
head -c 32 /dev/urandom > request.bin

# the documented commands, flag for flag
modelip encrypt-model --qpc model.qpc --mek MEK.dat --output-dir encrypted
modelip attest --ip 127.0.0.1 --port "$PORT" -d 0 -o pub0.dat > attest0.txt
modelip attest --ip 127.0.0.1 --port "$PORT" -d 1 -i request.bin -o pub1.dat > attest1.txt
grep -q "^verified: card" attest0.txt      # the configured root verified it
if modelip attest --ip 127.0.0.1 --port "$PORT" -d 0 -o MEK.dat 2> again.err; then
    echo "attest replaced the MEK with evidence" >&2; exit 1
fi
grep -q "MEK.dat: already exists; refusing to overwrite (--force replaces it)" again.err
modelip wrap-mek --mek MEK.dat --pub-keys pub0.dat pub1.dat --output-dir wrappedMEK 2> wrap.err
grep -q "not to one program" wrap.err      # one line says what an unbound slot means
modelip encrypt-with-session-keys --input-dir encrypted --mek MEK.dat \
    --pub-keys pub0.dat pub1.dat --output-dir final
modelip device load --ip 127.0.0.1 --port "$PORT" -d 1 --qpc final/programqpc.bin

# card 1 resets: attest again, wrap, swap its slot in (the unbound wrap of the reference)
modelip device reset --ip 127.0.0.1 --port "$PORT" -d 1
sleep 0.3
modelip attest --ip 127.0.0.1 --port "$PORT" -d 1 -o pub1-new.dat
modelip wrap-mek --mek MEK.dat --pub-keys pub0.dat pub1-new.dat --output-dir wrappedMEK2 2>/dev/null
modelip replace-mek --encrypted-qpc final --wrapped-meks wrappedMEK2/slot_1 --output-dir final2
modelip device load --ip 127.0.0.1 --port "$PORT" -d 1 --qpc final2/programqpc.bin
modelip device exec --ip 127.0.0.1 --port "$PORT" -d 1 --input x.npy --output y.npy
"$PY" -c "import numpy as np; np.testing.assert_allclose(np.load('y.npy'), np.load('expected.npy'), rtol=1e-5)"

# the single command: encrypt and wrap
modelip encrypt-model --qpc model.qpc --mek MEK.dat --output-dir single --pub-keys pub0.dat pub1-new.dat
modelip device load --ip 127.0.0.1 --port "$PORT" -d 0 --qpc single/programqpc.bin
modelip inspect single/programqpc.bin > inspect.txt
grep "key slot 1: card" inspect.txt > /dev/null
echo "DOCUMENTED FLOW OK"
