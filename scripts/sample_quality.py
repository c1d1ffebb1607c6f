"""Samples and repetition for the model card: ``python scripts/sample_quality.py [MODEL]``.

For each sampling setting, each card prompt and each seed, generates 200 tokens (not stopping
at the end of a paragraph, so every sample has the same length) and measures

* the share of distinct token 4-grams among them: 1.0 means no 4-gram repeats, a greedy loop
  drives it towards 0.  The tokens are those of the generated text encoded again (the same ids
  the generation produced, except where a piece sequence has a shorter spelling);
* with ``--corpus DIR``, the share of the generated words (runs of letters, lowercased) that
  appear nowhere in the ``*.txt`` files of DIR (the training corpus): words the model made up.
  A high 4-gram share bought with invented words is no better text.

Prints a Markdown table (one row per setting: the mean over seeds for each prompt, then over
everything) and then the samples (``--no-samples``: the table only).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import arianna_c  # noqa: E402

PROMPTS = ["Resonance is", "The soul of man", "Once upon a time"]
N_TOKENS = 200
WORD = re.compile(r"[^\W\d_]+")


def distinct_4gram_share(tokens: list[int]) -> float:
    grams = [tuple(tokens[i:i + 4]) for i in range(len(tokens) - 3)]
    return len(set(grams)) / len(grams) if grams else 1.0


def words(text: str) -> list[str]:
    return [w.lower() for w in WORD.findall(text)]


def corpus_words(folder: Path) -> set[str]:
    known: set[str] = set()
    files = sorted(folder.glob("*.txt"))
    if not files:
        raise SystemExit(f"error: --corpus {folder}: no .txt files there")
    for path in files:
        known.update(words(path.read_text(encoding="utf-8", errors="replace")))
    return known


def unknown_word_share(text: str, known: set[str]) -> float:
    ws = words(text)
    return sum(w not in known for w in ws) / len(ws) if ws else 0.0


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model", nargs="?", default=None, help="model .bin (default: the persona)")
    p.add_argument("--settings", default='[{"temperature": 0}]',
                   help='JSON list of sampling settings (Model.generate keywords), e.g. '
                        '\'[{"temperature": 0}, {"temperature": 0.8, "repeat_penalty": 1.1}]\'; '
                        'a setting not given is the library default (default: greedy only)')
    p.add_argument("--seeds", default="42", help="comma-separated seeds of every sampled row (default 42)")
    p.add_argument("--corpus", type=Path, help="folder of the training texts (*.txt): also measure "
                                               "the share of generated words not in them")
    p.add_argument("--no-samples", action="store_true", help="print the table only")
    args = p.parse_args(argv)
    settings = json.loads(args.settings)
    seeds = [int(s) for s in args.seeds.split(",")]
    known = corpus_words(args.corpus) if args.corpus else None
    columns = PROMPTS + ["mean", "min"] + (["unknown words"] if known is not None else [])
    print(f"seeds {args.seeds}; {N_TOKENS} tokens per sample; distinct 4-gram share"
          + ("; share of words not in the corpus" if known is not None else ""))
    print("| setting | " + " | ".join(columns) + " |")
    print("|---|" + "---:|" * len(columns))
    samples = []
    with (arianna_c.Model(args.model) if args.model else arianna_c.default_model()) as m:
        for s in settings:
            per_prompt, unknown = [], []
            for prompt in PROMPTS:
                shares = []
                for seed in seeds:
                    text = m.generate(prompt, N_TOKENS, ignore_eos=True, **{"seed": seed, **s})
                    shares.append(distinct_4gram_share(m.encode(text, bos=False)))
                    if known is not None:
                        unknown.append(unknown_word_share(text, known))
                    samples.append((prompt, s, seed, text))
                per_prompt.append(shares)
            cells = [f"{mean(x):.2f}" for x in per_prompt]
            everything = [x for shares in per_prompt for x in shares]
            cells += [f"{mean(everything):.3f}", f"{min(everything):.2f}"]
            if known is not None:
                cells.append(f"{mean(unknown):.3f}")
            print(f"| `{json.dumps(s)}` | " + " | ".join(cells) + " |", flush=True)
    if not args.no_samples:
        for prompt, s, seed, text in samples:
            print(f"\n## {prompt!r} {json.dumps(s)} seed {seed}\n{prompt}{text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
