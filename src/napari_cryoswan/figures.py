"""Matplotlib figures shared by the widgets and the reports (no Qt, no napari).

Each function draws on axes it is given, so a dock widget draws on its canvas and a report on
an Agg figure, and both show the same thing.
"""

from __future__ import annotations

import textwrap

from .metrics import FSC_THRESHOLDS, fsc_resolution


def draw_fsc(axes, curves: dict[str, dict], *, text_color: str = "black",
             background: str = "white", title: str | None = None, empty_text: str = "No FSC curves",
             label_width: int = 50) -> None:
    """Draw FSC curves on ``axes``, replacing what was there.

    Args:
        curves: label → ``FSCCurve.to_dict()`` (only "frequency" and "correlation" are read:
            the resolutions are read off the curve here, by ``metrics.fsc_resolution``).
        text_color, background: the colours of text and lines, and of the figure behind them.
        label_width: labels (layer names run long) are wrapped to this many characters.

    Each curve's legend entry gives its resolution at 0.5 and 0.143 (``Resolution.format``), and
    a crossing is marked on the curve. The frequency axis runs from 0 to the highest frequency
    among the curves (the Nyquist limit of the finest grid compared). The legend sits below the
    axes, at the figure level: give the figure ``layout="constrained"`` to make room for it.
    """
    figure = axes.figure
    axes.clear()
    for legend in list(figure.legends):
        legend.remove()
    figure.set_facecolor(background)
    axes.set_facecolor(background)
    for label, curve in curves.items():
        resolutions = [fsc_resolution(curve, t) for t in FSC_THRESHOLDS]
        text = ", ".join(f"{r.format()} at {r.threshold:g}" for r in resolutions)
        (line,) = axes.plot(curve["frequency"], curve["correlation"],
                            label=f"{textwrap.fill(label, label_width)}\n{text}")
        crossings = [r for r in resolutions if r.angstrom is not None]
        if crossings:
            axes.scatter([1 / r.angstrom for r in crossings], [r.threshold for r in crossings],
                         s=14, color=line.get_color(), zorder=3)
    for threshold in FSC_THRESHOLDS:
        axes.axhline(threshold, color=text_color, lw=0.7, ls="--", alpha=0.7)
        axes.annotate(f"{threshold:g}", (1.0, threshold), xycoords=("axes fraction", "data"),
                      color=text_color, fontsize=7, ha="right", va="bottom")
    axes.set_xlabel("spatial frequency (1/Å)", color=text_color)
    axes.set_ylabel("FSC", color=text_color)
    lowest = min((min(c["correlation"]) for c in curves.values() if len(c["correlation"])),
                 default=0.0)
    axes.set_ylim(min(-0.05, lowest - 0.05), 1.05)  # anticorrelation shows, not clipped
    highest = max((max(c["frequency"]) for c in curves.values() if len(c["frequency"])),
                  default=0.0)
    if highest > 0:
        axes.set_xlim(0.0, highest)
    if title:
        axes.set_title(title, color=text_color, fontsize=9)
    axes.tick_params(colors=text_color)
    for spine in axes.spines.values():
        spine.set_color(text_color)
    if curves:
        figure.legend(loc="outside lower center", fontsize=7, facecolor=background,
                      labelcolor=text_color, edgecolor=text_color)
    else:
        axes.text(0.5, 0.5, empty_text, ha="center", transform=axes.transAxes, color=text_color)
