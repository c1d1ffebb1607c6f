#!/usr/bin/env python3
"""Plato's dialogues as question and answer turns, for training the dialogue module.

    python3 scripts/make_dialogues.py [CORPUS_DIR] OUT_DIR

reads CORPUS_DIR/philosophy-plato-*.txt (Jowett's translations; default ../shared/corpus) and
writes OUT_DIR/train/<dialogue>.txt and OUT_DIR/heldout/<dialogue>.txt, each paragraph one pair

    Q: <a speaker's turn>
    A: <the next speaker's turn>

Every paragraph of a dialogue is one turn: "SOCRATES:  ..." labels are removed, and so are
simple speech tags of the narrated dialogues ("..., replied Cebes."), whose speakers alternate
paragraph by paragraph as the labelled ones do.  A turn that asks something (holds a "?") is
paired with the turn after it when that one replies without asking back (holds no "?"), so
every answer is a statement and no turn is both an answer and the next question.
A file whose median paragraph is longer than MAX_MEDIAN_TURN characters is a speech (the
Apology), not an exchange, and is left out; so are the front matter (title, persons, scene),
headings such as "BOOK II." (which also end a run of turns), and pairs with a question longer
than MAX_QUESTION or an answer longer than MAX_ANSWER characters.

Held out: pairs are cut into blocks of BLOCK consecutive pairs and every HELDOUT_EVERY-th block
goes to heldout/; the first pair of every block is dropped, so no turn is in both parts.
"""

from __future__ import annotations

import re
import statistics
import sys
from pathlib import Path

MAX_MEDIAN_TURN = 300
MAX_QUESTION = 400
MAX_ANSWER = 500
BLOCK = 10
HELDOUT_EVERY = 10

LABEL = re.compile(r"^([A-Z][A-Z]+(?: [A-Z]+)*):\s*")
FRONT_MATTER = ("PERSONS OF THE DIALOGUE", "SCENE", "PLACE OF THE NARRATION")
HEADING = re.compile(r"^(BOOK [IVXL]+\.|[A-Z][A-Z .]{0,40})$")
VERB = r"(?:said|replied|answered|asked|rejoined|continued|added|observed|interposed)"
SPEAKER = r"(?:I|he|she|they|[A-Z][a-z]+)"
# ", replied Cebes," / ", I said," inside a turn and "..., said he." / "? I said." at its end
TAG_INSIDE = re.compile(rf", (?:{SPEAKER} {VERB}|{VERB} {SPEAKER})(?: [a-z]+)?, ")
TAG_END = re.compile(rf"(?:, |(?<=[?!]) )(?:{SPEAKER} {VERB}|{VERB} {SPEAKER})\.$")


def paragraphs(text: str) -> list[str]:
    return [" ".join(p.split()) for p in re.split(r"\n\s*\n", text) if p.strip()]


def body(paras: list[str]) -> list[str]:
    """The paragraphs after the front matter: from "BOOK I." when there is one, else from the
    first labelled turn, else from the first paragraph after the list of persons."""
    for i, p in enumerate(paras):
        if p.startswith("BOOK I."):
            return paras[i + 1 :]
    for i, p in enumerate(paras):
        label = LABEL.match(p)
        if label and label.group(1) not in FRONT_MATTER:
            return paras[i:]
    return paras[3:]  # title, author, translator


def clean_turn(p: str) -> str:
    label = LABEL.match(p)
    if label:
        p = p[label.end():]
    p = TAG_INSIDE.sub(", ", p)
    p = TAG_END.sub(".", p) if not p.endswith(("?.", "!.")) else p
    return re.sub(r"([?!])\.$", r"\1", p).strip()


def runs_of_turns(text: str) -> list[list[str]]:
    """The dialogue's turns, split into runs at headings (a heading is not a turn)."""
    runs: list[list[str]] = [[]]
    for p in body(paragraphs(text)):
        if HEADING.match(p) or p.startswith(FRONT_MATTER):
            runs.append([])
            continue
        runs[-1].append(clean_turn(p))
    return [r for r in runs if len(r) > 1]


def pairs_of(runs: list[list[str]]) -> list[tuple[str, str]]:
    return [(q, a) for run in runs for q, a in zip(run, run[1:])]


def is_exchange(text: str) -> bool:
    return statistics.median(len(p) for p in paragraphs(text)) <= MAX_MEDIAN_TURN


def split(pairs: list[tuple[str, str]]) -> tuple[list, list]:
    """(train, heldout): every HELDOUT_EVERY-th block of BLOCK pairs is held out, the first pair
    of each block dropped (it shares a turn with the last pair of the block before)."""
    train, heldout = [], []
    for k, pair in enumerate(pairs):
        if k % BLOCK == 0:
            continue
        (heldout if (k // BLOCK) % HELDOUT_EVERY == HELDOUT_EVERY - 1 else train).append(pair)
    return train, heldout


def keep(pair: tuple[str, str]) -> bool:
    q, a = pair
    return "?" in q and "?" not in a and len(q) <= MAX_QUESTION and 1 < len(a) <= MAX_ANSWER


def as_text(pairs: list[tuple[str, str]]) -> str:
    return "".join(f"Q: {q}\nA: {a}\n\n" for q, a in pairs)


def main(corpus: Path, out: Path) -> None:
    files = sorted(corpus.glob("philosophy-plato-*.txt"))
    if not files:
        sys.exit(f"error: {corpus}: no philosophy-plato-*.txt files")
    for part in ("train", "heldout"):
        (out / part).mkdir(parents=True, exist_ok=True)
    totals = {"train": 0, "heldout": 0}
    for path in files:
        text = path.read_text(encoding="utf-8")
        name = path.stem.replace("philosophy-", "")
        if not is_exchange(text):
            print(f"{name}: skipped (a speech: median paragraph over {MAX_MEDIAN_TURN} characters)")
            continue
        train, heldout = split([p for p in pairs_of(runs_of_turns(text)) if keep(p)])
        for part, chosen in (("train", train), ("heldout", heldout)):
            (out / part / f"{name}.txt").write_text(as_text(chosen), encoding="utf-8")
            totals[part] += len(chosen)
        print(f"{name}: {len(train)} train / {len(heldout)} held-out pairs")
    print(f"total: {totals['train']} train / {totals['heldout']} held-out pairs in {out}")


if __name__ == "__main__":
    args = sys.argv[1:]
    if len(args) not in (1, 2):
        sys.exit("usage: python3 scripts/make_dialogues.py [CORPUS_DIR] OUT_DIR")
    repo = Path(__file__).resolve().parent.parent
    corpus = Path(args[0]) if len(args) == 2 else repo.parent / "shared" / "corpus"
    main(corpus, Path(args[-1]))
