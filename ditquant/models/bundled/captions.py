"""Captions for the mini PixArt: each Fashion-MNIST class named in varied wording, so the text path matters (the
model must learn that "tee", "t-shirt" and "top" mean one class and "shirt" another), and the tokenizer's vocabulary.

Training draws a template and a name at random per image; ``PROMPTS`` is the fixed evaluation set (one prompt per
class in a wording seen in training, used for the grid and for prompt-following accuracy).
"""

from __future__ import annotations

import torch

NAMES = (
    ("t-shirt", "tee", "short sleeve top", "plain top"),
    ("trousers", "pants", "pair of trousers", "pair of jeans"),
    ("pullover", "sweater", "jumper", "knitted pullover"),
    ("dress", "summer dress", "evening dress", "sleeveless dress"),
    ("coat", "jacket", "winter coat", "long coat"),
    ("sandal", "summer sandal", "strappy sandal", "flat sandal"),
    ("shirt", "button-up shirt", "blouse", "collared shirt"),
    ("sneaker", "trainer", "running shoe", "canvas sneaker"),
    ("bag", "handbag", "purse", "tote bag"),
    ("ankle boot", "boot", "short boot", "leather ankle boot"),
)
TEMPLATES = ("a {}", "a photo of a {}", "a picture of a {}", "product photo of a {}", "a {} on a plain background",
             "a small grey image of a {}", "catalogue image: {}", "{}", "a simple {}", "the {}")
PROMPTS = tuple(f"a photo of a {names[0]}" for names in NAMES)  # evaluation: class i <- PROMPTS[i]


def caption(label: int, generator: torch.Generator) -> str:
    names = NAMES[label]
    name = names[int(torch.randint(len(names), (1,), generator=generator))]
    template = TEMPLATES[int(torch.randint(len(TEMPLATES), (1,), generator=generator))]
    return template.format(name)


def vocabulary() -> list[tuple[str, float]]:
    """A Unigram vocabulary for ``transformers.T5Tokenizer``: special tokens, every caption word (whole-word pieces,
    more likely than any split), then single characters so that any other text still tokenizes."""
    words = sorted({w for names in NAMES for name in names for w in name.split()}
                   | {w for t in TEMPLATES for w in t.replace("{}", " ").split()})
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [(f"▁{w}", -2.0) for w in words]
    pieces += [("▁", -5.0)] + [(c, -10.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789-:.,'"]
    return pieces
