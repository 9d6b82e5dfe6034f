"""One way to draw a figure to PNG: matplotlib on the Agg backend (no display), imported on first use so that
importing a module that may draw stays cheap, and the PNG without the software tag (the same figure gives the same
bytes)."""

from __future__ import annotations

import io
from typing import Any

DPI = 100


def pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def png_bytes(figure: Any, **savefig: Any) -> bytes:
    """``figure`` as PNG bytes, closed afterwards; ``savefig``: more of matplotlib's options (``bbox_inches``)."""
    plt = pyplot()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI, metadata={"Software": None}, **savefig)
    plt.close(figure)
    return buffer.getvalue()
