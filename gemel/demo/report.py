"""The demo's report folder: report.md (tables), report.json (everything), examples.png."""
from __future__ import annotations

import json
from pathlib import Path

from gemel.eval.summary import format_summary


def write_report(folder: Path, report: dict, test, predictions: dict[str, list[dict]],
                 paths: dict[str, Path]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False),
                                        encoding="utf-8")
    image_rows = predictions["gemel + image"]
    plot_examples(folder / "examples.png", test, image_rows, paths["test"].parent)
    settings = report["settings"]
    md = [
        "# gemel demo",
        "",
        f"Made by `gemel demo --out {settings['out']}` in {report['seconds']} s "
        f"(LLM {settings['model']}, vision {settings['vision']}, vp-mode {settings['vp_mode']}, "
        f"template {settings['template']}, {settings['demos']} demonstrations, "
        f"{settings['epochs']} training epochs, dtype {settings['dtype']}).",
        "",
        "Steps (seconds): " + ", ".join(f"{k} {v}" for k, v in report["steps"].items()),
        "",
        "```",
        format_summary(report["evaluation"]),
        "```",
        "",
        "![test images with their boxes and answers](examples.png)",
        "",
        "| mention | gold | top-1 with the image | top-1 text only |",
        "|---|---|---|---|",
    ]
    text_rows = {r["id"]: r for r in predictions["gemel, text only"]}
    for m, row in zip(test, image_rows):
        md.append(f"| {m.mention or '[box]'} | {m.entity} | {_top(row)} | {_top(text_rows[m.id])} |")
    (folder / "report.md").write_text("\n".join(md) + "\n", encoding="utf-8")
    return folder


def _top(row: dict) -> str:
    return row["candidates"][0]["title"] if row["candidates"] else f"(error: {row.get('error')})"


def plot_examples(path: Path, test, rows: list[dict], data_folder: Path, n: int = 8) -> None:
    """A grid of test mentions that have an image: the picture, its box, gold and top-1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle
    from PIL import Image

    # half photos named in the text, half box-only mentions: both kinds of visual input
    with_image = [(m, r) for m, r in zip(test, rows) if m.image]
    boxes = [(m, r) for m, r in with_image if m.bbox or m.polygon]
    chosen = [x for x in with_image if x not in boxes][:n // 2] + boxes[:n - n // 2]
    cols = 4
    fig, axes = plt.subplots((len(chosen) + cols - 1) // cols, cols, figsize=(4 * cols, 3.4 *
                             ((len(chosen) + cols - 1) // cols)), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (m, row) in zip(axes.flat, chosen):
        ax.imshow(Image.open(m.image if Path(m.image).is_absolute() else data_folder / m.image))
        if m.bbox:
            x0, y0, x1, y1 = m.bbox
            ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, color="red", lw=2))
        top = _top(row)
        ok = bool(row["candidates"]) and row["candidates"][0]["entity_id"] == m.entity_id
        ax.set_title(f"{m.mention or '[box]'} -> {top}\ngold: {m.entity}", fontsize=9,
                     color="green" if ok else "red")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
