"""Prefetch models: LearnedClassifier runs an ONNX prefetch model (contract:
core/prefetch_card.py; checked by core/model.check_model as kind
"prefetch") with RuleClassifier's interface (offline/prefetch.py), so the
replay's KML-like policy and the agent take either.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from . import model as M
from . import prefetch_features as PF
from .prefetch_card import INPUT_NAME, LABEL_OUTPUT, PROBA_OUTPUT, TASK  # noqa: F401 (re-exported)


class LearnedClassifier:
    """An ONNX prefetch model (checked by core/model.check_model, kind
    prefetch) behind RuleClassifier's interface: classify(feats,
    has_writes, direction) -> class index or None, describe(), and
    class_readahead_kb (from the card)."""

    def __init__(self, path, check: bool = True):
        self.path = Path(path)
        if check:                     # the bytes checked are the bytes run
            self.card, raw = M._check(self.path, None, None, None, expect=TASK)
        else:
            raw = self.path.read_bytes()
            self.card = M.read_card(self.path)
        self.sess = M._session(None, raw)
        self.sha256 = M.model_sha256(raw)
        self.class_readahead_kb = tuple(int(c["readahead_kb"]) for c in self.card["classes"])
        self.min_events = int(self.card["min_events"])
        self.name = f"learned:{self.path.name}"

    def probabilities(self, rows) -> np.ndarray:
        x = np.ascontiguousarray(rows, dtype=np.float32).reshape(-1, PF.NUM_MODEL_INPUTS)
        return self.sess.run([PROBA_OUTPUT], {INPUT_NAME: x})[0]

    def classify(self, feats, has_writes: bool, direction: float) -> int | None:
        if feats[0] < self.min_events:
            return None
        p = self.probabilities([PF.model_row(feats, has_writes, direction)])
        return int(np.argmax(p[0]))

    def describe(self) -> str:
        ev = self.card.get("evaluation", {})
        acc = ev.get("accuracy")
        kb = ", ".join(f"{c} {k} KB" for c, k in zip(PF.PREFETCH_CLASSES,
                                                       self.class_readahead_kb))
        return (f"ONNX prefetch model {self.path} ({self.card.get('model', {}).get('layers', '?')}"
                + (f", held-back accuracy {acc:.3f}" if isinstance(acc, (int, float)) else "")
                + f"): < {self.min_events} insertions keep the readahead; classes {kb}")
