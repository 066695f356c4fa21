"""The shared end of every figure: save the PNG, read back what was written on it, close it."""

from __future__ import annotations

from pathlib import Path


def save_figure(fig, ax, path: Path, dpi: int = 130) -> dict:
    """Save ``fig`` to ``path`` (PNG), close it, and return the texts drawn on ``ax`` / ``fig``.

    Returns:
        {"title", "xlabel", "ylabel", "legend": [labels], "caption"} — what a reader sees, for tests.
    """
    fig.savefig(path, dpi=dpi)
    legend = ax.get_legend()
    texts = {"title": ax.get_title(), "xlabel": ax.get_xlabel(), "ylabel": ax.get_ylabel(),
             "legend": [t.get_text() for t in legend.get_texts()] if legend else [],
             "caption": " ".join(t.get_text() for t in fig.texts)}
    import matplotlib.pyplot as plt

    plt.close(fig)
    return texts
