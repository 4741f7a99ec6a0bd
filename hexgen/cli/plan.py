"""`hexgen plan`: validate a layout against a model and show each stage's TP ranks and layers."""
from __future__ import annotations

import argparse
import json
import sys

from hexgen.cli.generate import add_layout_args, resolve_model
from hexgen.config import Layout, valid_tp_degrees
from hexgen.errors import HexGenError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="hexgen plan", description=__doc__)
    add_layout_args(p)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    try:
        cfg = resolve_model(args).config()
        layout = Layout.build(cfg, args.hetero_config, args.pp_partition)
    except HexGenError as e:
        print(f"hexgen plan: {e}", file=sys.stderr)
        return 2
    stages = [{"stage": s.index, "tp": s.tp, "layers": [s.layer_start, s.layer_end - 1], "ranks": s.ranks}
              for s in layout.stages()]
    if args.json:
        print(json.dumps({"layout": layout.describe(), "world_size": layout.world_size, "stages": stages,
                          "valid_tp_degrees": valid_tp_degrees(cfg)}))
        return 0
    print(f"{layout.describe()}  (world size {layout.world_size}; valid TP degrees: "
          f"{', '.join(map(str, valid_tp_degrees(cfg)))})")
    for s in stages:
        print(f"  stage {s['stage']}: TP {s['tp']}, layers {s['layers'][0]}-{s['layers'][1]}, ranks {s['ranks']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
