"""Moderation of served text with the curation pipeline's own classifiers: toxicity (word lists + the hashed
n-gram classifier, nanoseek/data/curate/toxicity.py) and PII (nanoseek/data/curate/pii.py).

One text gets a result in the shape of OpenAI's moderation API (`/v1/moderations`, `client.moderations.create`):

    {"flagged": bool, "categories": {name: bool}, "category_scores": {name: float in [0, 1]}}

The categories are OpenAI's where a word list covers one (harassment <- profanity, hate, sexual, violence,
self-harm), plus nanoseek's own: `toxicity` (the classifier, over windows of the text) and `pii` (an e-mail
address, phone, IP or card number). A word-list category scores its share of the words against the curation
threshold (1.0 = the share at which curation removes a document) and is flagged at 1.0, or when the classifier
flags the text and that list matches at all. `flagged` is any toxicity category; PII alone does not flag a
text (a user may give their own address), it is reported and, when the server blocks, redacted from answers.

Precision and recall on the shipped held-out set (`lists/toxicity_heldout.txt`, never trained on):
`heldout_scores()`; the README gives the figures.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

from nanoseek.data.curate.pii import redact
from nanoseek.data.curate.toxicity import LISTS_DIR, ToxicityConfig, load_labelled, train_classifier

# our word-list category -> OpenAI's moderation category
OPENAI_NAMES = {"profanity": "harassment", "hate": "hate", "sexual": "sexual", "violence": "violence",
                "self_harm": "self-harm"}
HELDOUT = LISTS_DIR / "toxicity_heldout.txt"
MODES = ("off", "flag", "block")


@dataclass
class Moderator:
    """Scores texts; the classifier trains once per process (about a second), which the server does at start."""

    config: ToxicityConfig = field(default_factory=ToxicityConfig)

    @property
    def classifier(self):
        return _trained(self.config.train_path, tuple(self.config.categories))

    def __call__(self, text: str) -> dict[str, Any]:
        """The OpenAI-shaped moderation result of one text."""
        words = max(1, len(text.split()))
        toxic = self.classifier.document_score(text, self.config.window_words) if text.strip() else 0.0
        by_classifier = toxic >= self.config.threshold
        categories, scores = {}, {}
        for ours, name in OPENAI_NAMES.items():
            hits = sum(1 for _ in self.classifier.wordlists[ours].finditer(text))
            score = min(1.0, hits / words / self.config.max_wordlist_fraction)
            scores[name] = round(score, 4)
            categories[name] = score >= 1.0 or (by_classifier and hits > 0)
        scores["toxicity"], categories["toxicity"] = round(toxic, 4), by_classifier
        pii = sum(redact(text)[1].values())
        scores["pii"], categories["pii"] = float(pii > 0), pii > 0
        flagged = any(v for k, v in categories.items() if k != "pii")
        return {"flagged": flagged, "categories": categories, "category_scores": scores}

    def flagged(self, text: str) -> bool:
        return self(text)["flagged"]


@functools.cache
def _trained(train_path: str, categories: tuple[str, ...]):
    """The classifier of a labelled set and word lists, trained once per process (every server and test shares it)."""
    return train_classifier(ToxicityConfig(train_path=train_path, categories=categories))


def heldout_scores(moderator: Moderator | None = None) -> dict[str, float]:
    """Precision, recall and accuracy of `flagged` on the shipped held-out labelled set."""
    moderator = moderator or Moderator()
    texts, labels = load_labelled(HELDOUT)
    predicted = [moderator.flagged(t) for t in texts]
    tp = sum(p and y == 1 for p, y in zip(predicted, labels, strict=True))
    fp = sum(p and y == 0 for p, y in zip(predicted, labels, strict=True))
    fn = sum(not p and y == 1 for p, y in zip(predicted, labels, strict=True))
    return {"n": len(texts), "precision": float(tp / max(1, tp + fp)), "recall": float(tp / max(1, tp + fn)),
            "accuracy": float(sum(p == (y == 1) for p, y in zip(predicted, labels, strict=True)) / len(texts))}
