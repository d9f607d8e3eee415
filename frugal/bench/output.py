"""Where every bench puts its results: `out_dir/name.json` (indented) and `out_dir/name.png`."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path


def write_json_and_png(results: dict, out_dir: Path | str, name: str, plot: Callable[[Path], None]
                       ) -> tuple[Path, Path]:
    """Write `results` as JSON and call `plot(png_path)` to draw the chart; returns both paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out_dir / f"{name}.json", out_dir / f"{name}.png"
    json_path.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    plot(png_path)
    return json_path, png_path
