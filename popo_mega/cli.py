"""Console scripts. Each one imports its component lazily, so that ``popo-eval --help`` does not
pay for megatron-core and a missing optional dependency only matters to the command that needs it."""

import importlib
import sys


def _dispatch(module: str, func: str = "main"):
    def run(argv=None):
        return getattr(importlib.import_module(module), func)(sys.argv[1:] if argv is None else argv)
    return run


eval_main = _dispatch("popo_mega.eval.cli")
convert_main = _dispatch("popo_mega.model.convert_cli")
rollout_server_main = _dispatch("popo_mega.rollout.server")
report_main = _dispatch("popo_mega.train.report")
plan_main = _dispatch("popo_mega.plan")
train_main = _dispatch("popo_mega.train.cli")
