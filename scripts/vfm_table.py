"""Print the VFM registry as the Markdown table of docs/models.md (a test keeps the two equal)."""

from __future__ import annotations

from reglue.encoders.registry import CLIP_MEAN, HALF, IMAGENET_MEAN, VFM_REGISTRY, VFMEntry

PIXELS = {IMAGENET_MEAN: "ImageNet", CLIP_MEAN: "CLIP", HALF: "0.5"}


def _tokens(entry: VFMEntry) -> str:
    sides = [(entry.image_size(r) // entry.patch, entry.image_size(r)) for r in (256, 512)]
    return " / ".join(f"{g}x{g} ({size})" for g, size in sides)


def vfm_table() -> str:
    """One row per registry entry: what it is, the shapes REGLUE uses, how its weights and positions load."""
    rows = ["| name | timm id | patch | tokens at 256 / 512 px (input size) | width | depth | prefix tokens | "
            "global token | compressor layers | mean / std | positions | release file | note |",
            "|" + "---|" * 13]
    for name, e in VFM_REGISTRY.items():
        cells = [f"`{name}`", f"`{e.timm_id}`" if e.timm_id else "built in code", str(e.patch), _tokens(e),
                 str(e.width), str(e.depth), str(e.prefix_tokens), "[CLS]" if e.has_cls else "mean of patches",
                 ", ".join(map(str, e.last_layers)), PIXELS[e.mean], e.positions,
                 f"`{e.hub_file}`" if e.hub_file else "-", e.licence or ("random weights" if not e.timm_id else "")]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(vfm_table())
