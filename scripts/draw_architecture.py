"""Draw flamingo.png: the Flamingo architecture as flamingo_pytorch builds it.

Usage:
    python scripts/draw_architecture.py [--out flamingo.png]

Left: interleaved input, the frozen vision encoder and the trained Perceiver Resampler.
Middle: the frozen PaLM decoder with a trained GATED XATTN-DENSE block before every N-th layer.
Right: the text-to-media mask in immediate mode, computed by the library's own
``media_index`` and ``text_to_media_mask``, and the colour legend.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

FROZEN = {"face": "#dbe7f5", "edge": "#3b6ea5"}
TRAINED = {"face": "#ffe0b8", "edge": "#d9480f"}
TENSOR = {"face": "#ffffff", "edge": "#868e96"}
MASK_ON = "#495057"
INK = "#212529"
ARROW = "#495057"
TITLE, BODY, SMALL = 20, 15.5, 14

# The interleaved example; its first token precedes every image, so it reads no media.
TOKENS = ["Pets:", "<image>", "a", "cat", "<image>", "a", "dog"]


def box(ax, x, y, w, h, style, title="", lines=(), tag="", dashed=False, title_size=TITLE):
    """A rounded box with a bold title, detail lines below it and an optional corner tag."""
    from matplotlib.patches import FancyBboxPatch

    ax.add_patch(
        FancyBboxPatch(
            (x, y),
            w,
            h,
            boxstyle="round,pad=0,rounding_size=0.12",
            facecolor=style["face"],
            edgecolor=style["edge"],
            linewidth=2.2,
            linestyle="--" if dashed else "-",
        )
    )
    rows = ([title] if title else []) + list(lines)
    step = 0.38
    top = y + h / 2 - (0.1 if tag else 0.0) + step * (len(rows) - 1) / 2
    for i, row in enumerate(rows):
        bold = i == 0 and bool(title)
        size = title_size if bold else BODY
        ax.text(x + w / 2, top - i * step, row, ha="center", va="center", fontsize=size, color=INK,
                fontweight="bold" if bold else "normal")  # fmt: skip
    if tag:
        ax.text(x + w - 0.1, y + h - 0.06, tag, ha="right", va="top", fontsize=12, color=style["edge"],
                fontweight="bold")  # fmt: skip


def arrow(ax, start, end, text="", text_xy=None):
    """An arrow from start to end, with an optional italic label (a tensor shape)."""
    ax.annotate("", xy=end, xytext=start, arrowprops=dict(arrowstyle="-|>", color=ARROW, lw=2.0, mutation_scale=20))
    if text:
        tx, ty = text_xy if text_xy is not None else ((start[0] + end[0]) / 2 + 0.12, (start[1] + end[1]) / 2)
        ax.text(tx, ty, text, ha="left", va="center", fontsize=SMALL, style="italic", color=INK)


def draw_input(ax):
    """The interleaved sequence along the bottom, images drawn as thumbnails; -> thumbnail centres."""
    import numpy as np

    ramp = np.linspace(0, 1, 16)
    shades = [np.outer(ramp, ramp[::-1]), np.outer(ramp[::-1], ramp)]
    x, thumbs = 0.3, []
    for word in [*TOKENS, "…"]:
        is_media = word == "<image>"
        w = 0.95 if is_media else 0.5 + 0.15 * len(word)
        box(ax, x, 0.3, w, 0.6, TENSOR, lines=[] if is_media else [word])
        if is_media:
            cmap = ("YlGnBu", "OrRd")[len(thumbs)]
            ax.imshow(shades[len(thumbs)], extent=(x + 0.1, x + w - 0.1, 0.37, 0.83), cmap=cmap, zorder=3)
            thumbs.append(x + w / 2)
        x += w + 0.1
    ax.text(x + 0.05, 0.6, "interleaved input", fontsize=BODY, fontweight="bold", color=INK, va="center")
    return thumbs, x - 0.1 - 0.65 / 2


def draw_vision(ax, thumbs):
    """Frozen vision encoder -> Perceiver Resampler -> media latents (left column)."""
    left, width = 0.3, 4.9
    for thumb, end in zip(thumbs, (1.9, 3.6)):
        arrow(ax, (thumb, 0.95), (end, 1.75))
    ax.text(2.75, 1.3, "images (b, t, c, H, W)", fontsize=SMALL, style="italic", color=INK, va="center",
            ha="center")  # fmt: skip
    box(ax, left, 1.75, width, 1.0, FROZEN, "Vision encoder  ❄", ["img_encoder: eval mode, no_grad"], tag="frozen")
    arrow(ax, (2.75, 2.75), (2.75, 3.3), "features (b, t, p, e)")
    box(ax, left, 3.3, width, 3.85, TRAINED, tag="trained")
    ax.text(left + width / 2, 6.7, "Perceiver Resampler", ha="center", va="center", fontsize=TITLE,
            fontweight="bold", color=INK)  # fmt: skip
    ax.text(left + 0.2, 6.27, "features + learned time embeddings", fontsize=BODY, color=INK, va="center")
    ax.text(left + 0.2, 5.9, "learned latents (m, e); paper: m = 64", fontsize=BODY, color=INK, va="center")
    box(ax, left + 0.25, 3.95, width - 0.5, 1.65, TENSOR, "depth × [attention + FFW]",
        ["Q = latents", "K, V = concat(media, latents)"], title_size=16)  # fmt: skip
    ax.text(left + width / 2, 3.6, "then LayerNorm; each item on its own", ha="center", fontsize=BODY, va="center")
    arrow(ax, (2.75, 7.15), (2.75, 7.65))
    box(ax, left + 0.4, 7.65, 3.9, 0.65, TENSOR, lines=["media latents (b, t, m, e)"])
    # Route the latents right, then down into the side of the gated block.
    ax.plot([left + 4.3, 5.62, 5.62], [7.97, 7.97, 4.0], color=ARROW, lw=2.0, solid_joinstyle="round")
    arrow(ax, (5.6, 4.0), (6.1, 4.0))
    ax.text(5.5, 6.0, "to every gated block", rotation=90, ha="center", va="center", fontsize=SMALL,
            style="italic", color=INK, bbox=dict(facecolor="white", edgecolor="none", pad=1))  # fmt: skip


def draw_decoder(ax, text_x):
    """Token embedding -> [gated block, N frozen PaLM layers] x depth/N -> logits (middle column)."""
    left, width = 6.1, 4.6
    mid = left + width / 2
    arrow(ax, (text_x, 0.95), (mid, 1.75), "text (b, n); <image> = media_token_id", (mid + 0.1, 1.3))
    box(ax, left, 1.75, width, 0.65, FROZEN, "Token embedding  ❄", title_size=16)
    arrow(ax, (mid, 2.4), (mid, 3.05))
    box(ax, left - 0.2, 2.8, width + 0.4, 5.0, TENSOR, dashed=True)
    box(ax, left, 3.05, width, 2.0, TRAINED, "GATED XATTN-DENSE",
        ["x += tanh(α) · xattn(x, media, mask)", "x += tanh(β) · FFW(x)", "α = β = 0 at init → identity"],
        tag="trained", title_size=17)  # fmt: skip
    arrow(ax, (mid, 5.05), (mid, 5.3))
    box(ax, left, 5.3, width, 1.5, FROZEN, "PaLM layer  ❄",
        ["x + attn(LN x) + SwiGLU(LN x)", "multi-query · rotary · causal"], tag="frozen", title_size=17)  # fmt: skip
    ax.text(mid, 7.08, "⋮  N − 1 more frozen PaLM layers", ha="center", va="center", fontsize=BODY, color=INK)
    ax.text(mid, 7.5, "× depth / N,   N = cross_attn_every", ha="center", va="center", fontsize=SMALL,
            fontweight="bold", color=INK)  # fmt: skip
    arrow(ax, (mid, 7.8), (mid, 8.05))
    box(ax, left, 8.05, width, 0.65, FROZEN, "LayerNorm → tied logits  ❄", title_size=16)
    arrow(ax, (mid, 8.7), (mid, 9.1))
    ax.text(mid, 9.3, "next-token logits (b, n, v)", ha="center", va="center", fontsize=BODY, style="italic")


def draw_mask(ax, allowed):
    """The (n, t) text-to-media mask grid: rows are tokens, columns media items."""
    from matplotlib.patches import Rectangle

    x0, top, cell_w, cell_h = 12.5, 7.95, 0.9, 0.66
    ax.text(13.35, 9.3, "Text-to-media mask", ha="center", va="center", fontsize=17, fontweight="bold", color=INK)
    ax.text(13.35, 8.85, "immediate mode: each token reads\nonly the latest image", ha="center", va="center",
            fontsize=SMALL, color=INK)  # fmt: skip
    for j in range(allowed.shape[1]):
        ax.text(x0 + (j + 0.5) * cell_w, top + 0.25, f"img {j + 1}", ha="center", va="center", fontsize=SMALL)
    for i, token in enumerate(TOKENS):
        y = top - (i + 1) * cell_h
        ax.text(x0 - 0.12, y + cell_h / 2, token, ha="right", va="center", fontsize=BODY, color=INK)
        for j in range(allowed.shape[1]):
            on = bool(allowed[i, j])
            ax.add_patch(Rectangle((x0 + j * cell_w, y), cell_w, cell_h, facecolor=MASK_ON if on else "white",
                                   edgecolor=ARROW, linewidth=1.2))  # fmt: skip
        if not allowed[i].any():
            ax.text(x0 + 2 * cell_w + 0.12, y + cell_h / 2, "reads nothing:\nexactly 0", fontsize=SMALL,
                    va="center", color=INK)  # fmt: skip
    bottom = top - len(TOKENS) * cell_h
    ax.text(13.35, bottom - 0.35, "index = cumsum(text == <image>)", ha="center", va="center", fontsize=SMALL,
            family="monospace")  # fmt: skip


def draw_legend(ax):
    from matplotlib.patches import Patch

    handles = [
        Patch(facecolor=FROZEN["face"], edgecolor=FROZEN["edge"], linewidth=2, label="❄ frozen"),
        Patch(facecolor=TRAINED["face"], edgecolor=TRAINED["edge"], linewidth=2, label="trained"),
        Patch(facecolor=MASK_ON, edgecolor=ARROW, label="mask: may attend"),
    ]
    ax.legend(handles=handles, loc="lower right", bbox_to_anchor=(0.995, 0.02), fontsize=BODY, frameon=True,
              framealpha=1.0, edgecolor=TENSOR["edge"])  # fmt: skip


def immediate_mask():
    """The mask for TOKENS, computed by the library itself: (n, t) bool."""
    import torch

    from flamingo_pytorch.cross_attention import media_index, text_to_media_mask

    locations = torch.tensor([[token == "<image>" for token in TOKENS]])  # (1, n)
    num_media = int(locations.sum())
    allowed = text_to_media_mask(
        media_index(locations), None, num_text=len(TOKENS), num_media=num_media, only_immediate=True
    )
    return allowed[0].numpy()  # (n, t)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("flamingo.png"), help="where to write the PNG")
    args = parser.parse_args()
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit("draw_architecture.py needs matplotlib: pip install matplotlib")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository's own flamingo_pytorch

    fig = plt.figure(figsize=(16, 10), dpi=100, facecolor="white")
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, 16)
    ax.set_ylim(0, 10)
    ax.set_aspect("equal")
    ax.axis("off")
    ax.text(0.3, 9.55, "Flamingo in flamingo_pytorch", fontsize=24, fontweight="bold", color=INK, va="center")
    thumbs, text_x = draw_input(ax)
    draw_vision(ax, thumbs)
    draw_decoder(ax, text_x)
    draw_mask(ax, immediate_mask())
    draw_legend(ax)
    fig.savefig(args.out, dpi=100, facecolor="white")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
