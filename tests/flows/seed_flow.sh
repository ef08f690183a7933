#!/usr/bin/env bash
# The reference tool's documented file-level flow, with modelip in its place:
# generate-mek, encrypt-model without keys, attest, wrap-mek,
# encrypt-with-session-keys, reset, replace-mek, verify. Run in an empty dir.
set -euo pipefail

head -c 200000 /dev/urandom > network.elf
printf 'descriptor' > networkdesc.bin
modelip pack -o model.qpc --segment network.elf=network.elf --segment networkdesc.bin=networkdesc.bin

modelip generate-mek -o MEK.dat
modelip encrypt-model --qpc model.qpc --mek MEK.dat --output-dir enc

modelip pki init pki
modelip card init --pki pki --id 0 -o card0.json
modelip card init --pki pki --id 1 -o card1.json
head -c 32 /dev/urandom > request.bin
modelip card attest card0.json -i request.bin -o pub0.dat
modelip card attest card1.json -o pub1.dat

modelip wrap-mek --mek MEK.dat --encrypted-qpc enc --pub-keys pub0.dat pub1.dat --trust-root pki/root.pem --output-dir wrapped
test -s wrapped/slot_0/MEK.encrypt && test -s wrapped/slot_1/MEK.pub && test -s wrapped/config.json
modelip encrypt-with-session-keys --input-dir enc --mek MEK.dat --pub-keys pub0.dat pub1.dat \
    --trust-root pki/root.pem --output-dir final
modelip card load card0.json final/programqpc.bin
modelip card load card1.json final/programqpc.bin

modelip card reset card1.json
if modelip card load card1.json final/programqpc.bin 2>err.txt; then
    echo "a stale slot must not load" >&2; exit 1
fi
grep -q "earlier session" err.txt

modelip card attest card1.json -o pub1-new.dat
modelip wrap-mek --mek MEK.dat --encrypted-qpc final --pub-keys pub0.dat pub1-new.dat --trust-root pki/root.pem --output-dir wrapped2
modelip replace-mek --encrypted-qpc final --wrapped-meks wrapped2/slot_1 --in-place
modelip card load card1.json final/programqpc.bin
modelip verify --qpc final/programqpc.bin --mek MEK.dat --extract plain
cmp plain/network.elf network.elf
modelip inspect final/programqpc.bin
echo "SEED FLOW OK"
