"""The contract of an ONNX prefetch model and its card (core/model.py
checks models of this kind against it; core/prefetch_model.py runs them).

Graph contract: one float32 input "features" [N, NUM_MODEL_INPUTS] taking
raw values in the units of prefetch_features.MODEL_INPUTS (the schema's 5
KML features, then direction and has_writes); a float32 output
"probabilities" [N, len(PREFETCH_CLASSES)], one column per class in
PREFETCH_CLASSES order (any normalisation is inside the graph).

Card (task "prefetch"; the fields every card has are in core/model.py):
schema_version (prefetch_features.SCHEMA_VERSION), features [{name, unit}]
= MODEL_INPUTS in input order, classes [{name, readahead_kb}] in output
order (the readahead each class gets, from the recordings' sweep),
min_events (a window with fewer insertions gets no decision), evaluation
(held-back accuracy), training (recordings, split).
"""

from __future__ import annotations

import numpy as np

from . import prefetch_features as PF

TASK = "prefetch"
INPUT_NAME = "features"
PROBA_OUTPUT = "probabilities"
LABEL_OUTPUT = "label"
MAX_READAHEAD_KB = PF.MAX_READAHEAD_KB
# card fields of a prefetch model (beyond core/model.py's common ones)
REQUIRED_FIELDS = ("classes", "min_events")


def schema_dict() -> dict:
    """The input schema as a prefetch card records it."""
    return {"schema_version": PF.SCHEMA_VERSION,
            "features": [{"name": n, "unit": u} for n, u in PF.MODEL_INPUTS],
            "window_s": PF.WINDOW_S}


def synthetic_rows(n: int = 256, seed: int = 0) -> np.ndarray:
    """Plausible and extreme input rows (units as in MODEL_INPUTS)."""
    rng = np.random.default_rng(seed)
    x = np.zeros((n, PF.NUM_MODEL_INPUTS), dtype=np.float32)
    x[:, 0] = rng.integers(0, 200_000, n)                     # events
    x[:, 1] = rng.lognormal(3, 3, n)                          # variance over range
    x[:, 2] = x[:, 1] * rng.uniform(1.0, 1.1, n)
    x[:, 3] = rng.lognormal(2, 4, n)                          # mean |delta|
    x[:, 4] = rng.choice([0.0, 0.0625, 0.25, 0.9375, 2.0], n)  # readahead / 1024
    x[:, 5] = rng.uniform(-1, 1, n)
    x[:, 6] = rng.integers(0, 2, n)
    x[0] = 0.0                                                # an empty window
    x[1] = [1e7, 1e12, 1e12, 1e12, 2048.0, -1.0, 1.0]
    return x


def check_card_fields(card: dict, cp, error) -> None:
    """The prefetch-specific part of a card check; `error(msg, hint=None)`
    makes the exception (core/model.py's ModelCheckError)."""
    missing = [k for k in REQUIRED_FIELDS if k not in card]
    if missing:
        raise error(f"card {cp}: lacks fields {missing} (a prefetch model's card)")
    if card["schema_version"] != PF.SCHEMA_VERSION:
        raise error(f"card {cp}: prefetch feature schema version {card['schema_version']}, "
                    f"this iobridge uses prefetch feature schema version {PF.SCHEMA_VERSION}",
                    "retrain the model with this iobridge (`iobridge train --task prefetch`)")
    names = [f.get("name") for f in card["features"]]
    if names != list(PF.MODEL_INPUT_NAMES):
        raise error(f"card {cp}: card features {names} differ from the prefetch model inputs "
                    f"of schema v{PF.SCHEMA_VERSION} {list(PF.MODEL_INPUT_NAMES)}")
    classes = card["classes"]
    if not isinstance(classes, list) or not all(isinstance(c, dict) for c in classes):
        raise error(f"card {cp}: field 'classes' should be an array of objects "
                    "{name, readahead_kb}")
    cnames = [c.get("name") for c in classes]
    if cnames != list(PF.PREFETCH_CLASSES):
        raise error(f"card {cp}: classes {cnames} differ from the prefetch classes "
                    f"{list(PF.PREFETCH_CLASSES)} (in output order)")
    for c in classes:
        kb = c.get("readahead_kb")
        if isinstance(kb, bool) or not isinstance(kb, int) or not 0 <= kb <= MAX_READAHEAD_KB \
                or kb % 4:
            raise error(f"card {cp}: class {c['name']!r} has readahead_kb {kb!r}, expected "
                        f"a whole number of pages (multiple of 4) from 0 to {MAX_READAHEAD_KB}")
    me = card["min_events"]
    if isinstance(me, bool) or not isinstance(me, int) or me < 1:
        raise error(f"card {cp}: field 'min_events' should be a positive integer, "
                    f"found {me!r}")


