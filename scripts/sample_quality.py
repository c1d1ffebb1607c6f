"""Samples and repetition for the model card: ``python scripts/sample_quality.py [MODEL]``.

For each card prompt and each sampling setting, generates 200 tokens (not stopping at the end
of a paragraph, so every row has the same length) and reports the share of distinct token
4-grams among them: 1.0 means no 4-gram repeats, a greedy loop drives it towards 0. The tokens
are those of the generated text encoded again (the same ids the generation produced, except
where a piece sequence has a shorter spelling). Prints a Markdown table and the samples.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import arianna_c  # noqa: E402

PROMPTS = ["Resonance is", "The soul of man", "Once upon a time"]
N_TOKENS = 200


def distinct_4gram_share(tokens: list[int]) -> float:
    grams = [tuple(tokens[i:i + 4]) for i in range(len(tokens) - 3)]
    return len(set(grams)) / len(grams) if grams else 1.0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model", nargs="?", default=None, help="model .bin (default: the persona)")
    p.add_argument("--settings", default='[{"temperature": 0}]',
                   help='JSON list of sampling settings, e.g. \'[{"temperature": 0}, {"temperature": 0.8}]\'')
    p.add_argument("--seed", type=int, default=42, help="seed of every sampled row (default 42)")
    args = p.parse_args(argv)
    settings = json.loads(args.settings)
    with (arianna_c.Model(args.model) if args.model else arianna_c.default_model()) as m:
        print("| prompt | " + " | ".join(json.dumps(s) for s in settings) + " |")
        print("|---|" + "---:|" * len(settings))
        samples = []
        for prompt in PROMPTS:
            shares = []
            for s in settings:
                text = m.generate(prompt, N_TOKENS, ignore_eos=True, seed=args.seed, **s)
                shares.append(distinct_4gram_share(m.encode(text, bos=False)))
                samples.append((prompt, s, text))
            print(f"| {prompt} | " + " | ".join(f"{x:.2f}" for x in shares) + " |")
        for prompt, s, text in samples:
            print(f"\n## {prompt!r} {json.dumps(s)}\n{prompt}{text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
