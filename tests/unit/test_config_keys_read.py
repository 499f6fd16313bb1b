"""Every config key is read by the code it configures (issue 11): a key that nothing reads is a
setting that silently does nothing. CPU, AST only (no model, no run); ~1 s.

How a read is found: the source of popo_mega/ (config.py itself excluded) is parsed, and each
expression is given a config section type where one can be told:

- a parameter annotated with a config dataclass (``algo: AlgorithmConfig``, also as a string),
- a name or ``self.``/``obj.`` attribute whose last part is ``cfg`` / ``config`` or ends in
  ``_cfg`` / ``_config`` (unannotated: taken to be the whole ``Config``),
- ``<typed>.<field>`` where the field is itself a section (``cfg.algorithm.popo``),
- a name or ``self.`` attribute assigned from a typed expression (``r = cfg.rollout``,
  ``self.popo = algo.popo``; in a class, ``self.`` bindings hold in every method, and in the
  subclasses defined in the same module), a class-level annotation (``algo: AlgorithmConfig``
  types ``self.algo``), and names of an enclosing function (closures).

A key ``section.field`` is read when ``<expression of that section's type>.field`` (or
``getattr(<typed>, "field")``) is loaded somewhere. Untyped attribute accesses never count, so
``args.temperature`` of an argparse namespace does not read ``eval.temperature``, and
``trainer.model.dtype`` does not read ``model.dtype``: a common name (``n``, ``name``) only counts
on the right section. What is not seen (a sub-config passed to an unannotated parameter with
another name) fails this test: annotate the parameter.

Keys known to be unread today are xfail(strict=True), one parameter each: wiring one turns its
xfail into a failure that makes the wirer remove the mark.
"""

from __future__ import annotations

import ast
import dataclasses
import os
import typing

import pytest

from popo_mega import config as config_mod
from popo_mega.data.paths import REPO_ROOT

PACKAGE = os.path.join(REPO_ROOT, "popo_mega")

# Issue 11: keys whose components are being built later. Remove a key here when it gets wired.
NOT_WIRED_YET: set[str] = set()   # algorithm.grpo.beta_kl, train.updates_per_rollout: wired (train/step.py, loop.py)


def _config_classes() -> dict[str, type]:
    """Every config dataclass reachable from Config, by class name."""
    out, todo = {}, [config_mod.Config]
    while todo:
        cls = todo.pop()
        out[cls.__name__] = cls
        hints = typing.get_type_hints(cls)
        todo += [hints[f.name] for f in dataclasses.fields(cls) if dataclasses.is_dataclass(hints[f.name])]
    return out


CLASSES = _config_classes()


def _section_fields(cls: type) -> dict[str, type | None]:
    """field name -> its config dataclass type (None for a leaf value)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] if dataclasses.is_dataclass(hints[f.name]) else None
            for f in dataclasses.fields(cls)}


def config_keys() -> list[tuple[str, type, str]]:
    """(dotted key, owning class, field) for every leaf key a YAML file can set (Config.source is
    not one: load_config sets it)."""
    keys = []

    def walk(cls, prefix):
        for name, sub in _section_fields(cls).items():
            if cls is config_mod.Config and name == "source":
                continue
            if sub is not None:
                walk(sub, prefix + name + ".")
            else:
                keys.append((prefix + name, cls, name))

    walk(config_mod.Config, "")
    return keys


# --------------------------------------------------------------------------------------------
# The scanner
# --------------------------------------------------------------------------------------------

def _dotted(node: ast.AST) -> str | None:
    """'a.b.c' for a chain of names/attributes, else None."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return ".".join([node.id] + parts[::-1])
    return None


def _looks_like_config(name: str) -> bool:
    last = name.rsplit(".", 1)[-1]
    return last in ("cfg", "config") or last.endswith(("_cfg", "_config"))


def _annotation_class(ann: ast.AST | None) -> type | None:
    if ann is None:
        return None
    if isinstance(ann, ast.Constant) and isinstance(ann.value, str):
        try:
            ann = ast.parse(ann.value, mode="eval").body
        except SyntaxError:
            return None
    if isinstance(ann, ast.Attribute):  # config.DataConfig
        return CLASSES.get(ann.attr)
    if isinstance(ann, ast.Name):
        return CLASSES.get(ann.id)
    if isinstance(ann, ast.BinOp):  # DataConfig | None
        return _annotation_class(ann.left) or _annotation_class(ann.right)
    if isinstance(ann, ast.Subscript):  # Optional[DataConfig]
        return _annotation_class(ann.slice)
    return None


class _Scanner:
    """Collects (class, field) pairs read through typed expressions in one module."""

    def __init__(self):
        self.reads: set[tuple[type, str]] = set()
        self.class_self: dict[str, dict[str, type]] = {}  # class name -> its self.<x> types (for subclasses)

    def type_of(self, node: ast.AST, env: dict[str, type]) -> type | None:
        name = _dotted(node)
        if name is not None:
            if name in env:
                return env[name]
            if "." not in name and _looks_like_config(name):
                return config_mod.Config
            if "." in name and _looks_like_config(name) and not isinstance(node, ast.Name):
                base = self.type_of(node.value, env)
                if base is None:  # self.cfg, trainer.cfg: the whole Config
                    return config_mod.Config
        if isinstance(node, ast.Attribute):
            base = self.type_of(node.value, env)
            if base is not None:
                return _section_fields(base).get(node.attr)
        return None

    def bind(self, target: ast.AST, value: ast.AST, env: dict[str, type]) -> bool:
        """Record ``target = value`` when value is typed; True if env changed."""
        if isinstance(target, ast.Tuple) and isinstance(value, ast.Tuple) and len(target.elts) == len(value.elts):
            return any([self.bind(t, v, env) for t, v in zip(target.elts, value.elts)])
        name = _dotted(target)
        tp = self.type_of(value, env)
        if name is None or tp is None or env.get(name) is tp:
            return False
        env[name] = tp
        return True

    def function_env(self, fn, outer: dict[str, type]) -> dict[str, type]:
        env = dict(outer)
        args = fn.args
        for a in args.posonlyargs + args.args + args.kwonlyargs + [x for x in (args.vararg, args.kwarg) if x]:
            tp = _annotation_class(a.annotation)
            if tp is not None:
                env[a.arg] = tp
            else:
                env.pop(a.arg, None)  # a parameter shadows an outer name
        changed = True
        while changed:  # assignments in any order (loops) until nothing new is learnt
            changed = False
            for node in _own_nodes(fn):
                if isinstance(node, ast.Assign):
                    changed |= any([self.bind(t, node.value, env) for t in node.targets])
                elif isinstance(node, ast.AnnAssign):
                    tp = _annotation_class(node.annotation)
                    name = _dotted(node.target)
                    if tp is not None and name is not None and env.get(name) is not tp:
                        env[name], changed = tp, True
                    elif node.value is not None:
                        changed |= self.bind(node.target, node.value, env)
                elif isinstance(node, ast.NamedExpr):
                    changed |= self.bind(node.target, node.value, env)
        return env

    def record(self, root: ast.AST, env: dict[str, type]) -> None:
        for node in _own_nodes(root):
            if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
                tp = self.type_of(node.value, env)
                if tp is not None and node.attr in _section_fields(tp):
                    self.reads.add((tp, node.attr))
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr"
                  and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant)):
                tp = self.type_of(node.args[0], env)
                if tp is not None and node.args[1].value in _section_fields(tp):
                    self.reads.add((tp, node.args[1].value))

    def scope(self, node: ast.AST, env: dict[str, type]) -> None:
        """Scan a module, class or function body and everything nested in it."""
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            env = self.function_env(node, env) if not isinstance(node, ast.Lambda) else env
        elif isinstance(node, ast.ClassDef):
            env = dict(env)
            for base in node.bases:  # a subclass of a class scanned in this module has its self.<x> types
                env.update(self.class_self.get(_dotted(base) or "", {}))
            for stmt in node.body:  # class-level ``algo: AlgorithmConfig`` types self.algo
                tp = _annotation_class(stmt.annotation) if isinstance(stmt, ast.AnnAssign) else None
                if tp is not None and isinstance(stmt.target, ast.Name):
                    env["self." + stmt.target.id] = tp
            methods = [n for n in node.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
            for _ in range(2):  # self.<x> bindings made in one method hold in all of them
                for m in methods:
                    menv = self.function_env(m, env)
                    env.update({k: v for k, v in menv.items() if k.startswith("self.")})
            self.class_self[node.name] = {k: v for k, v in env.items() if k.startswith("self.")}
        self.record(node, env)
        for child in _nested_scopes(node):
            self.scope(child, env)


_SCOPES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)


def _own_nodes(root: ast.AST):
    """The nodes of ``root``'s body, not descending into nested functions or classes."""
    todo = list(ast.iter_child_nodes(root))
    while todo:
        node = todo.pop()
        yield node
        if not isinstance(node, _SCOPES):
            todo += list(ast.iter_child_nodes(node))


def _nested_scopes(root: ast.AST):
    """The functions and classes directly inside ``root``, in source order (a base class first)."""
    return sorted((node for node in _own_nodes(root) if isinstance(node, _SCOPES)), key=lambda n: n.lineno)


def reads_in(sources: dict[str, str]) -> set[tuple[type, str]]:
    """(config class, field) read anywhere in ``sources`` (file name -> Python source)."""
    scanner = _Scanner()
    for text in sources.values():
        scanner.scope(ast.parse(text), {})
    return scanner.reads


def package_sources() -> dict[str, str]:
    out = {}
    for root, _, files in os.walk(PACKAGE):
        for f in files:
            path = os.path.join(root, f)
            if f.endswith(".py") and path != os.path.abspath(config_mod.__file__):
                with open(path, encoding="utf-8") as fh:
                    out[os.path.relpath(path, REPO_ROOT)] = fh.read()
    return out


# --------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------

def test_scanner_tells_sections_apart_and_ignores_untyped_reads():
    """The scanner on hand-written code: right section only, through the binding forms it claims."""
    code = '''
from popo_mega.config import AlgorithmConfig, Config

def rollout(cfg: Config, args, trainer):
    t = cfg.rollout.temperature        # rollout.temperature, not eval.temperature
    n = args.n                         # argparse: not eval.n
    d = trainer.model.dtype            # a module: not model.dtype
    r, e = cfg.rollout, cfg.eval
    return r.top_p, getattr(e, "limit")

def algo(a: "AlgorithmConfig"):
    p = a.popo
    def inner():
        return p.alpha                 # closure: popo.alpha, not a3po.alpha
    return inner

class Trainer:
    def __init__(self, cfg):
        self.cfg = cfg
        self.grpo = cfg.algorithm.grpo
    def step(self):
        return self.grpo.beta_kl, self.cfg.train.seed
'''
    got = {(cls.__name__, f) for cls, f in reads_in({"x.py": code})}
    assert got >= {("RolloutConfig", "temperature"), ("RolloutConfig", "top_p"), ("EvalConfig", "limit"),
                   ("PopoConfig", "alpha"), ("GrpoConfig", "beta_kl"), ("TrainConfig", "seed")}
    for wrong in (("EvalConfig", "temperature"), ("EvalConfig", "n"), ("ModelConfig", "dtype"),
                  ("A3poConfig", "alpha")):
        assert wrong not in got, wrong
    keys = {k for k, _, _ in config_keys()}
    assert keys >= {"eval.n", "algorithm.popo.alpha", "data.synthetic.seed"} and "source" not in keys


_READS = None


def _package_reads():
    global _READS
    if _READS is None:
        _READS = reads_in(package_sources())
    return _READS


def _params():
    out = []
    for key, cls, name in config_keys():
        marks = [pytest.mark.xfail(strict=True, reason="issue 11: not wired yet")] if key in NOT_WIRED_YET else []
        out.append(pytest.param(key, cls, name, id=key, marks=marks))
    return out


@pytest.mark.parametrize("key, cls, name", _params())
def test_config_key_is_read(key, cls, name):
    assert (cls, name) in _package_reads(), (
        f"config key '{key}' ({cls.__name__}.{name}) is read nowhere in popo_mega/ outside config.py: "
        f"wire it into the component it configures or delete it (from configs/*.yaml and docs too)")


def test_not_wired_list_names_real_keys():
    assert NOT_WIRED_YET <= {k for k, _, _ in config_keys()}
