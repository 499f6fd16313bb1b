"""``popo-train --config configs/X.yaml [key.sub=value ...]``: the RL trainer.

Run it under torchrun for several processes (launch/train.sh); alone, it is one process.
Ends by printing the held-out accuracy before and after (synthetic task) and the report PNG.
"""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="popo-train", description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, help="YAML run config (see configs/)")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, applied in order")
    args = p.parse_args(argv)
    from popo_mega.config import ConfigError, load_config
    from popo_mega.train.loop import run

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"popo-train: {e}", file=sys.stderr)
        return 2
    result = run(cfg)
    pct = lambda a: "n/a" if a is None else f"{100 * a:.1f}%"  # noqa: E731 - None: the evaluation failed
    if result.initial_accuracy is not None:
        print(f"initial accuracy: {pct(result.initial_accuracy)}")
        print(f"final accuracy: {pct(result.final_accuracy)}")
    if result.report_png:
        print(f"report: {result.report_png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
