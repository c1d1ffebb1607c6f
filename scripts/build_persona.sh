#!/usr/bin/env bash
# Build the persona from a folder of public-domain text: tokenizer, shards, training, export.
# Everything goes into the folder given with --out; persona/ is only written with --install.
# Needs the torch extra; about two hours on two CPU cores with the defaults.
#
#   bash scripts/build_persona.sh [options] [-- more `arianna_c.train train` flags]
#
#   --corpus DIR        folder of .txt files                      (default: ../shared/corpus)
#   --out DIR           work and result folder                    (default: build/persona)
#   --tokenizer MODEL   use this SentencePiece .model instead of training one into OUT
#   --minutes N         training time budget, minutes             (default: 115)
#   --max-steps N       optimizer steps at most                   (default: 100000)
#   --batch-size N      rows of 256 tokens per step               (default: 16)
#   --lr X / --min-lr X peak / final learning rate                (default: 2e-3 / 2e-4)
#   --warmup-steps N    linear warmup steps                       (default: 100)
#   --init-from PATH    start from these weights (a checkpoint folder or a model .bin)
#   --resume            continue OUT/run where it stopped
#   --install           copy the model and tokenizer files into persona/ at the end
#
# The result: OUT/arianna_v1_base.bin, OUT/tok4096.bin (+ .model), the run in OUT/run
# (ckpt/, best/, history.json). For several processes run the training step by hand under
# torchrun (README "Training").
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

CORPUS=../shared/corpus OUT=build/persona TOKENIZER="" MINUTES=115 MAX_STEPS=100000 BATCH=16
LR=2e-3 MIN_LR=2e-4 WARMUP=100 INSTALL=0 EXTRA=()
while (($#)); do
    case "$1" in
        --corpus) CORPUS="$2"; shift 2 ;;
        --out) OUT="$2"; shift 2 ;;
        --tokenizer) TOKENIZER="$2"; shift 2 ;;
        --minutes) MINUTES="$2"; shift 2 ;;
        --max-steps) MAX_STEPS="$2"; shift 2 ;;
        --batch-size) BATCH="$2"; shift 2 ;;
        --lr) LR="$2"; shift 2 ;;
        --min-lr) MIN_LR="$2"; shift 2 ;;
        --warmup-steps) WARMUP="$2"; shift 2 ;;
        --init-from) EXTRA+=(--init-from "$2"); shift 2 ;;
        --resume) EXTRA+=(--resume); shift ;;
        --install) INSTALL=1; shift ;;
        --) shift; EXTRA+=("$@"); break ;;
        *) echo "error: unknown option $1 (see the comment at the top of $0)" >&2; exit 1 ;;
    esac
done
PYTHON="${PYTHON:-python3}"
mkdir -p "$OUT"

if [[ -z "$TOKENIZER" ]]; then
    "$PYTHON" -m arianna_c.train tokenizer --corpus "$CORPUS" --out "$OUT/tok4096" --vocab-size 4096
    rm -f "$OUT/tok4096.vocab"
    TOKENIZER="$OUT/tok4096.model"
elif [[ "$TOKENIZER" != "$OUT/tok4096.model" ]]; then
    cp "$TOKENIZER" "$OUT/tok4096.model"
fi
"$PYTHON" -m arianna_c.export tokenizer "$OUT/tok4096.model" "$OUT/tok4096.bin"
"$PYTHON" -m arianna_c.train pretokenize --corpus "$CORPUS" --tokenizer "$OUT/tok4096.model" --out "$OUT/data"
if [[ " ${EXTRA[*]} " == *" --resume "* ]]; then
    "$PYTHON" -m arianna_c.train train --out "$OUT/run" "${EXTRA[@]}"
else
    "$PYTHON" -m arianna_c.train train --data "$OUT/data" --out "$OUT/run" \
        --batch-size "$BATCH" --lr "$LR" --min-lr "$MIN_LR" --warmup-steps "$WARMUP" \
        --max-steps "$MAX_STEPS" --time-budget "$MINUTES" --eval-interval 250 --eval-batches 16 \
        --log-interval 25 --compile --threads 2 "${EXTRA[@]}"
fi
make libarianna.so
"$PYTHON" -m arianna_c.export model "$OUT/run/best" "$OUT/arianna_v1_base.bin"

if ((INSTALL)); then
    cp "$OUT/arianna_v1_base.bin" "$OUT/tok4096.bin" "$OUT/tok4096.model" persona/
    echo "installed into persona/"
fi
