#!/usr/bin/env bash
# Build the shipped dialogue module, persona/modules/dialogue.bin, for the persona base as it is
# now (re-run it whenever persona/arianna_v1_base.bin changes: a module applies to one base):
# Plato's dialogues as Q/A turns (scripts/make_dialogues.py), a LoRA module trained on them with
# the base frozen and the base corpus' validation loss guarded, then the numbers and samples
# for persona/README.md, written to WORK/report.md.  Needs the torch extra.
#
#   bash scripts/build_dialogue_module.sh [CORPUS_DIR] [WORK_DIR] [MINUTES]
#
# MINUTES (default 20) is the budget of training steps; THREADS (default 1) the torch threads.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

CORPUS="${1:-../shared/corpus}"
WORK="${2:-build/dialogue}"
MINUTES="${3:-20}"
PYTHON="${PYTHON:-python3}"
THREADS="${THREADS:-1}"
BASE=persona/arianna_v1_base.bin
TOKENIZER=persona/tok4096.model
MODULE=persona/modules/dialogue.bin

rm -rf "$WORK/text" "$WORK/data/train" "$WORK/data/heldout" "$WORK/ckpt"
"$PYTHON" scripts/make_dialogues.py "$CORPUS" "$WORK/text"
for part in train heldout; do
    "$PYTHON" -m arianna_c.train pretokenize --corpus "$WORK/text/$part" --tokenizer "$TOKENIZER" \
        --out "$WORK/data/$part"
done
# The base corpus, for the guard and the report: tokenized once, kept between runs.
[ -f "$WORK/data/base/shards.json" ] ||
    "$PYTHON" -m arianna_c.train pretokenize --corpus "$CORPUS" --tokenizer "$TOKENIZER" --out "$WORK/data/base"

mkdir -p persona/modules
"$PYTHON" -m arianna_c.train module --base "$BASE" --data "$WORK/data/train" --guard-data "$WORK/data/base" \
    --out "$MODULE" --ckpt "$WORK/ckpt" --rank 8 --alpha 16 --lr 3e-4 --min-lr 3e-5 --warmup-steps 20 \
    --batch-size 16 --max-steps 100000 --time-budget "$MINUTES" --eval-interval 25 --eval-batches 8 \
    --log-interval 5 --guard-margin 0.02 --threads "$THREADS"

# Held-out Q/A loss and the base corpus' validation loss (16 x 16 windows, as the model card
# measures the base), with and without the module.
"$PYTHON" -m arianna_c.lora eval --base "$BASE" --module "$MODULE" --heldout "$WORK/data/heldout" \
    --data "$WORK/data/base" --qa "$WORK/text/heldout" --eval-batches 16 --batch-size 16 \
    --threads "$THREADS" > "$WORK/eval.json"

make -s libarianna.so run
"$PYTHON" - "$WORK" "$MODULE" "$BASE" <<'EOF'
import json, subprocess, sys
from pathlib import Path

work, module, base = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
losses = json.loads((work / "eval.json").read_text())
rows = [("held-out Q/A text, all tokens", f"{work}/data/heldout"),
        ("held-out Q/A, answer tokens only", f"{work}/text/heldout (answer tokens)"),
        ("base corpus validation", f"{work}/data/base")]
lines = ["| loss (nats/token) | base | base + dialogue module |", "| --- | ---: | ---: |"]
for label, key in rows:
    lines.append(f"| {label} | {losses['base'][key]:.4f} | {losses['with_modules'][key]:.4f} |")
questions = ["What is justice?", "Is the soul immortal?", "What is virtue, Socrates?", "Why do you weep?"]
lines += ["", "| prompt | settings | base | + `-L " + module + "` |", "| --- | --- | --- | --- |"]
# Greedy (with the default repeat penalty) and the library's default sampling, seeded.
for q in questions:
    for label, settings in (("`-t 0`", ["-t", "0"]), ("defaults, `-s 42`", ["-s", "42"])):
        texts = []
        for extra in ([], ["-L", module]):
            r = subprocess.run(["./run", base, "-z", "tok4096", "-n", "80", "-i", f"Q: {q}\nA:", *settings, *extra],
                               capture_output=True, check=True)
            text = r.stdout.decode("utf-8", "replace").strip()[len(f"Q: {q}\nA:"):].strip()
            texts.append(" ".join(text.split()).replace("|", "\\|"))
        lines.append(f"| `Q: {q}\\nA:` | {label} | {texts[0]} | {texts[1]} |")
report = "\n".join(lines) + "\n"
(work / "report.md").write_text(report)
print(report)
EOF
"$PYTHON" -m arianna_c.modules info "$MODULE" --base "$BASE"
