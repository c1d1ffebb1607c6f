#!/usr/bin/env bash
# Rebuild the shipped persona from the public-domain corpus: tokenizer, shards, training, export.
# This is exactly how persona/ was made (see persona/README.md). It needs the torch extra and
# takes about two hours on two CPU cores; the checkpoint stays outside git in $WORK.
#
#   bash scripts/build_persona.sh [CORPUS_DIR] [WORK_DIR] [TIME_BUDGET_MINUTES]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

CORPUS="${1:-../shared/corpus}"
WORK="${2:-build/persona}"
MINUTES="${3:-115}"
PYTHON="${PYTHON:-python3}"

"$PYTHON" -m arianna_c.train tokenizer --corpus "$CORPUS" --out persona/tok4096 --vocab-size 4096
rm -f persona/tok4096.vocab
"$PYTHON" -m arianna_c.export tokenizer persona/tok4096.model persona/tok4096.bin
"$PYTHON" -m arianna_c.train pretokenize --corpus "$CORPUS" --tokenizer persona/tok4096.model --out "$WORK/data"
"$PYTHON" -m arianna_c.train train --data "$WORK/data" --out "$WORK/ckpt" \
    --batch-size 16 --lr 2e-3 --min-lr 2e-4 --warmup-steps 100 --max-steps 100000 \
    --time-budget "$MINUTES" --eval-interval 250 --eval-batches 16 --log-interval 25 --compile --threads 2
make libarianna.so
"$PYTHON" -m arianna_c.export model "$WORK/ckpt/best.pt" persona/arianna_v1_base.bin
