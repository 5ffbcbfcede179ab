"""Shared helpers for the offline-workflow tests (traces, models)."""

from pathlib import Path

from iobridge.offline.trace import traces_dir

REPO = Path(__file__).resolve().parent.parent
SHIPPED_MODEL = REPO / "models" / "admission-default.onnx"


def shared_trace(name: str) -> Path:
    """Path of a real trace in ../shared/traces; fails (never skips) when absent."""
    p = traces_dir() / name
    assert p.exists(), (f"real trace {p} is missing: tests need ../shared/traces beside the "
                        "repository (or IOBRIDGE_TRACES pointing at it)")
    return p
