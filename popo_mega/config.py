"""Run configuration: YAML -> frozen, typed dataclasses, one per component.

    cfg = load_config("configs/quickstart_cpu.yaml", ["train.lr=1e-5", "parallel.tensor=2"])

Every key is checked against the dataclass it lands in: an unknown key (with a "did you mean"),
a value of the wrong type or outside its choices, and an impossible parallel layout are a
:class:`ConfigError` that names the key and the file (or the command-line override it came from).
No value is ever read from environment variables: what a run does is what its YAML and its
overrides say.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Literal, Optional

import yaml


class ConfigError(ValueError):
    """A configuration problem; the message names the key and where it came from."""


# --------------------------------------------------------------------------------------------
# Components
# --------------------------------------------------------------------------------------------

_cfg = dataclass(frozen=True, kw_only=True, slots=True)


@_cfg
class ModelConfig:
    """The policy: a Megatron GPT model built from an HF ``config.json`` (Qwen2/Qwen2.5/Llama-3)."""

    hf_path: str = ""                       # HF directory: config.json, tokenizer, optional safetensors
    load_weights: bool = True               # False: random init from the config (tests, quickstart base)
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    transformer_impl: Literal["auto", "transformer_engine", "local"] = "auto"
    make_vocab_size_divisible_by: int = 128  # megatron pads the vocabulary to a multiple of this x TP
    fp8: Optional[Literal["e4m3", "hybrid"]] = None
    fp8_recipe: Literal["delayed", "tensorwise", "mxfp8", "blockwise"] = "delayed"
    fp8_amax_history_len: int = 1024
    fp8_amax_compute_algo: Literal["max", "most_recent"] = "max"
    recompute_granularity: Optional[Literal["full", "selective"]] = None


@_cfg
class ParallelConfig:
    tensor: int = 1
    pipeline: int = 1
    expert: int = 1                         # MoE models: each layer's experts split over this many ranks,
                                            # carved from the data-parallel ranks (megatron's EP)
    sequence_parallel: bool = False
    distributed_optimizer: bool = True


@_cfg
class PopoConfig:
    """Eq. P1-P6 of docs/algorithms.md; defaults are the authors'."""

    alpha: float = 0.1                      # similarity weight (P5)
    beta: float = 0.01                      # entropy weight (P5)
    weight_mode: Literal["softmax", "uniform"] = "softmax"
    weight_temperature: float = 1.0         # T_w (P1)
    length_normalize: bool = False
    is_correction: Literal["none", "token"] = "token"
    entropy_on: Literal["all", "positive"] = "positive"
    tau: float = 0.995                      # EMA momentum (P6); 1.0 freezes the target
    tau_schedule: Literal["constant", "cosine"] = "constant"
    predictor_hidden: int = 1024
    predictor_layers: int = 2
    noise_std: float = 0.02
    reward_threshold: float = 0.0           # tau_r: positive iff reward > this
    predictor_dtype: Literal["model", "fp32"] = "model"   # h_phi's parameters: the model's dtype, or fp32
                                            # (the authors' PredictorMLP is never cast); train/step.py


@_cfg
class GrpoConfig:
    std_normalize: bool = True
    beta_kl: float = 0.0
    aggregation: Literal["token_mean", "seq_mean_token_mean"] = "token_mean"
    dynamic_sampling: bool = False          # DAPO: drop groups whose rewards are all equal, then refill
    max_refill_rounds: int = 4              # dynamic sampling: extra rollout rounds per step to refill
                                            # data.prompts_per_step informative groups (train/refill.py)


@_cfg
class A3poConfig:
    ratio: float = 0.2
    rho: float = 2.0
    alpha: float = 0.005


@_cfg
class AlgorithmConfig:
    name: Literal["popo", "grpo", "a3po"] = "popo"
    eps_low: float = 0.2
    eps_high: float = 0.28
    popo: PopoConfig = field(default_factory=PopoConfig)
    grpo: GrpoConfig = field(default_factory=GrpoConfig)
    a3po: A3poConfig = field(default_factory=A3poConfig)


@_cfg
class RolloutConfig:
    backend: Literal["embedded", "sglang"] = "embedded"
    weights: Literal["ema", "online"] = "ema"
    group_size: int = 8                     # G rollouts per prompt
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 512
    urls: tuple[str, ...] = ()              # attach to running servers instead of launching
    num_servers: int = 1
    server_tp: int = 1
    mem_fraction: float = 0.8
    host: str = "127.0.0.1"                 # launched servers listen here, each on a free port (no port key:
                                            # a fixed one would collide between runs; attach with urls)
    api_key: Optional[str] = None
    request_timeout_s: float = 600.0
    retries: int = 2
    on_server_failure: Literal["retry", "error"] = "retry"
    sync: Literal["auto", "distributed", "tensor", "disk"] = "auto"  # per server (placement.sync_methods):
                                            # auto: update_weights_from_tensor for colocated servers on
                                            # rank 0's node, the weight-update group for the others;
                                            # distributed: the group for all (not colocated: NCCL refuses
                                            # two ranks on one GPU); tensor: all by tensor (all on rank 0's
                                            # node); disk: update_weights_from_disk. The group falls back
                                            # to disk when it cannot form.
    bucket_mb: int = 512
    verify_sync: bool = True
    deterministic: bool = True              # servers get --enable-deterministic-inference: without it SGLang
                                            # ignores the per-rollout seeds (HttpEngine warns at the first step)
    master_address: Optional[str] = None    # this host as the servers' weight-update ranks dial it; unset:
                                            # 127.0.0.1 if every server is local, else the routed interface's
    max_server_restarts: int = 3            # dead launched servers relaunched per run before giving up
    max_staleness: int = 0                  # k: the rollouts of steps t+1 .. t+k are sampled while step t
                                            # trains (train/rollout_pipeline.py); 0: on-policy, one phase at a time
    pause_mode: Literal["retract", "in_place"] = "retract"   # how a weight sync pauses generation in flight
                                            # (SGLang /pause_generation): retract re-computes the rows' K/V on
                                            # the new weights and flushes the cache; in_place keeps it (no flush)


@_cfg
class SyntheticTaskConfig:
    """popo_mega.rewards.synthetic.SyntheticTask: ``a op b`` with a, b in [0, max_operand]."""

    max_operand: int = 99
    ops: tuple[str, ...] = ("+",)
    n_heldout: int = 500
    seed: int = 0
    fixed_width: bool = True                # zero-padded operands and answers ("07+45=" -> "052")


@_cfg
class DataConfig:
    train: tuple[str, ...] = ()             # "synthetic", set names (math_train, gsm8k_train, ...) or file paths
    template: Literal["qwen-math", "plain", "chat"] = "qwen-math"
    synthetic: SyntheticTaskConfig = field(default_factory=SyntheticTaskConfig)
    prompt_key: Optional[str] = None
    answer_key: Optional[str] = None
    bad_records: Literal["skip", "error"] = "skip"
    prompts_per_step: int = 64
    max_prompt_tokens: int = 1024           # longer prompts are left out and counted per file (start-up log, metrics)
    shuffle_seed: int = 0


@_cfg
class TrainConfig:
    steps: int = 100
    lr: float = 1e-6
    min_lr: float = 0.0
    lr_schedule: Literal["constant", "cosine"] = "constant"
    warmup_steps: int = 0
    warmup_fraction: float = 0.0            # warm-up as a fraction of train.steps, ceil(steps x fraction)
                                            # steps (HF's warmup_ratio); exclusive with warmup_steps
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    grad_clip: float = 1.0
    micro_batch_tokens: int = 8192          # packed tokens per micro-batch
    updates_per_rollout: int = 1            # optimizer steps per rollout batch
    seed: int = 1234
    output_dir: str = "runs/default"
    save_interval: int = 50
    keep_last: int = 2
    log_interval: int = 1
    kernels: Literal["auto", "extension", "reference"] = "auto"
    tensorboard: bool = True
    optimizer_cpu_offload: bool = False     # megatron-core's HybridDeviceOptimizer: Adam state and step of a
                                            # fraction of the parameters on the host (CUDA only; needs
                                            # parallel.distributed_optimizer: see train/step.py)
    optimizer_offload_fraction: float = 1.0  # of this rank's optimizer parameters (by element), with the above


@_cfg
class EvalConfig:
    interval: int = 0                       # 0 disables periodic evaluation
    benchmarks: tuple[str, ...] = ()
    n: int = 1                              # samples per problem
    temperature: float = 0.0
    max_new_tokens: int = 1024
    limit: Optional[int] = None
    model: Literal["policy", "served"] = "policy"   # held-out accuracy of the online policy, or of what
                                                    # the engine serves (the EMA with rollout.weights ema)


@_cfg
class PlacementConfig:
    """Which GPUs of each node run the trainer and which the rollout servers (popo_mega/rollout/placement.py)."""

    mode: Literal["disaggregated", "colocated"] = "disaggregated"
    nodes: Optional[int] = None             # nodes the run is written for (launch/train.sh checks NNODES);
    gpus_per_node: Optional[int] = None     # unset: as launched (NNODES, the GPUs the node shows)
    trainer_gpus_per_node: Optional[int] = None   # disaggregated: the first N GPUs of each node; unset: all
                                                  # that the servers leave and the layout can use


@_cfg
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    placement: PlacementConfig = field(default_factory=PlacementConfig)
    source: str = "<defaults>"              # the YAML file this came from (for error messages)


# --------------------------------------------------------------------------------------------
# Loading and checking
# --------------------------------------------------------------------------------------------

def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value, tp, key: str, where: str):
    """Check ``value`` against the annotation ``tp``; return it in the dataclass's type."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else
                          f"{where}: key '{key}' has value {value!r}, expected {_type_name(tp)}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: key '{key}' has value {value!r}, expected one of {list(args)}")
        return value
    if origin in (tuple, list):
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: key '{key}' has value {value!r} ({type(value).__name__}), expected a list")
        item = args[0] if args else typing.Any
        return tuple(_coerce(v, item, f"{key}[{i}]", where) for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: key '{key}' must be a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, key, where)
    if tp is typing.Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: key '{key}' has value {value!r} ({type(value).__name__}), expected bool")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: key '{key}' has value {value!r} ({type(value).__name__}), expected int")
        return value
    if tp is float:
        if isinstance(value, str):  # PyYAML (YAML 1.1) reads "1e-6" as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: key '{key}' has value {value!r} ({type(value).__name__}), expected float")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: key '{key}' has value {value!r} ({type(value).__name__}), expected str")
        return value
    raise TypeError(f"config field '{key}' has an unsupported annotation {tp!r}")


def _build(cls, raw: dict, prefix: str, where: str):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.name != "source"]
    kwargs = {}
    for key, value in raw.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{prefix + '.' if prefix else ''}{close[0]}'?)" if close else ""
            raise ConfigError(f"{where}: unknown key '{full}'{hint}; valid keys: {', '.join(names)}")
        kwargs[key] = _coerce(value, hints[key], full, where)
    return cls(**kwargs)


def _parse_override(text: str) -> tuple[list[str], object]:
    if "=" not in text:
        raise ConfigError(f"command-line override '{text}' is not of the form key.sub=value")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"command-line override '{text}' has an empty key part")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"command-line override '{text}': cannot parse value: {e}") from None
    return parts, value


def _merge(raw: dict, parts: list[str], value, origin: str) -> None:
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{origin}: key '{'.'.join(parts[:i + 1])}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def config_from_dict(raw: dict, source: str = "<dict>", overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Build a :class:`Config` from a mapping plus ``key.sub=value`` overrides (applied in order)."""
    raw = json.loads(json.dumps(raw)) if raw else {}
    for text in overrides:
        parts, value = _parse_override(text)
        probe: dict = {}
        _merge(probe, parts, value, f"command-line override '{text}'")
        # Check the override alone first, so that its error names the override rather than the file.
        _build(Config, probe, "", f"command-line override '{text}' (config {source})")
        _merge(raw, parts, value, source)
    cfg = dataclasses.replace(_build(Config, raw, "", source), source=source)
    _check_values(cfg)
    _check_eval(cfg.eval, cfg.source)
    from popo_mega.rollout.placement import place

    place(cfg, check_only=True)  # the GPU placement must fit: errors name the placement/rollout/parallel key
    return cfg


# Ranges of numeric keys: (key, rule, who reads it / why). Checked at load, before anything is built
# (issue 15: train.lr=-1, train.steps=-1 and rollout.group_size=0 failed only after the model was built
# and the servers launched, with torch tracebacks naming no key and a run directory left behind;
# data.prompts_per_step=0 ran empty steps with reward NaN; POPO with group_size 1 ran without a word).
# Every rule is written so that NaN fails it (comparisons with NaN are False); floats must be finite.
_RANGE_RULES = {
    ">= 0": lambda v: 0 <= v < math.inf,
    "> 0": lambda v: 0 < v < math.inf,
    ">= 1": lambda v: 1 <= v < math.inf,
    ">= 2": lambda v: 2 <= v < math.inf,
    "in [0, 1]": lambda v: 0 <= v <= 1,
    "in [0, 1)": lambda v: 0 <= v < 1,
    "in (0, 1]": lambda v: 0 < v <= 1,
    "finite": lambda v: -math.inf < v < math.inf,
}
_RANGES = (
    ("model.make_vocab_size_divisible_by", ">= 1", "the padded vocabulary is a multiple of it"),
    ("model.fp8_amax_history_len", ">= 1", "Transformer Engine's amax history length"),
    ("algorithm.eps_low", "in [0, 1]", "the clip's lower bound 1 - eps_low must be >= 0"),
    ("algorithm.eps_high", ">= 0", "the clip's upper bound is 1 + eps_high"),
    ("algorithm.popo.alpha", ">= 0", "the similarity term's weight (P5)"),
    ("algorithm.popo.beta", "finite", "the entropy term's weight (P5)"),
    ("algorithm.popo.weight_temperature", "> 0", "the softmax weights divide by it (P1)"),
    ("algorithm.popo.tau", "in [0, 1]", "EMA momentum (P6)"),
    ("algorithm.popo.predictor_hidden", ">= 1", "the predictor's width"),
    ("algorithm.popo.predictor_layers", ">= 1", "the predictor's Linear layers"),
    ("algorithm.popo.noise_std", ">= 0", "a standard deviation"),
    ("algorithm.popo.reward_threshold", "finite", "positive iff reward > it"),
    ("algorithm.grpo.max_refill_rounds", ">= 0", "extra rollout rounds"),
    ("algorithm.a3po.ratio", "in [0, 1]", "the fraction of tokens shaped"),
    ("algorithm.a3po.rho", "finite", "the initial shaping scale"),
    ("algorithm.a3po.alpha", ">= 0", "the shaping scale's decay per step"),
    ("rollout.group_size", ">= 2", "POPO, GRPO and A3PO compare rollouts within a group"),
    ("rollout.temperature", ">= 0", "0 is greedy"),
    ("rollout.top_p", "in (0, 1]", "a probability mass"),
    ("rollout.max_new_tokens", ">= 1", "tokens per rollout"),
    ("rollout.request_timeout_s", "> 0", "seconds"),
    ("rollout.retries", ">= 0", "retries per request"),
    ("rollout.bucket_mb", ">= 1", "weight-sync bucket size"),
    ("rollout.max_server_restarts", ">= 0", "relaunches per run"),
    ("rollout.max_staleness", ">= 0", "steps a rollout may lag the policy it trains"),
    ("data.prompts_per_step", ">= 1", "prompts per step"),
    ("data.max_prompt_tokens", ">= 1", "the longest prompt kept"),
    ("train.steps", ">= 0", "0 trains nothing"),
    ("train.lr", "> 0", "the peak learning rate"),
    ("train.min_lr", ">= 0", "the schedule's floor"),
    ("train.weight_decay", ">= 0", "AdamW's decay"),
    ("train.adam_beta1", "in [0, 1)", "Adam's first-moment decay"),
    ("train.adam_beta2", "in [0, 1)", "Adam's second-moment decay"),
    ("train.grad_clip", ">= 0", "0 disables clipping"),
    ("train.optimizer_offload_fraction", "in [0, 1]", "the fraction of the optimizer state kept on the host"),
    ("train.micro_batch_tokens", ">= 1", "packed tokens per micro-batch"),
    ("train.save_interval", ">= 0", "0 saves no checkpoint"),
    ("train.keep_last", ">= 1", "checkpoints kept (train/checkpoint.py)"),
    ("train.log_interval", ">= 1", "steps between console lines (train/metrics.py)"),
)


def _check_ranges(cfg: Config) -> None:
    """Each key of ``_RANGES`` within its range; the error names the key, the rule, the value and the file."""
    for key, rule, why in _RANGES:
        value = cfg
        for part in key.split("."):
            value = getattr(value, part)
        if not _RANGE_RULES[rule](value):
            raise ConfigError(f"{cfg.source}: key '{key}' must be {rule} ({why}), got {value!r}")
    t = cfg.train
    if t.min_lr > t.lr:
        raise ConfigError(f"{cfg.source}: key 'train.min_lr' ({t.min_lr}) must be <= train.lr ({t.lr})")
    from popo_mega.rewards.synthetic import SyntheticTask

    syn = cfg.data.synthetic
    try:
        SyntheticTask(max_operand=syn.max_operand, ops=syn.ops, n_heldout=syn.n_heldout, seed=syn.seed,
                      fixed_width=syn.fixed_width)
    except ValueError as e:
        raise ConfigError(f"{cfg.source}: key 'data.synthetic': {e}") from None


def _check_values(cfg: Config) -> None:
    """Value checks a type cannot express; errors name the key and the file."""
    _check_ranges(cfg)
    where, t = cfg.source, cfg.train
    if not 0.0 <= t.warmup_fraction < 1.0:
        raise ConfigError(f"{where}: key 'train.warmup_fraction' must be in [0, 1), got {t.warmup_fraction}")
    if t.warmup_fraction > 0 and t.warmup_steps > 0:
        raise ConfigError(f"{where}: keys 'train.warmup_steps' ({t.warmup_steps}) and 'train.warmup_fraction' "
                          f"({t.warmup_fraction}) both set the warm-up; set one of them to 0")
    if t.warmup_steps < 0:
        raise ConfigError(f"{where}: key 'train.warmup_steps' must be >= 0, got {t.warmup_steps}")
    if t.optimizer_cpu_offload and not cfg.parallel.distributed_optimizer:
        # megatron-core 0.16.1: offload runs through the precision-aware optimizer path (Megatron-LM's
        # arguments.py requires --use-precision-aware-optimizer with --optimizer-cpu-offload), and
        # OptimizerConfig.__post_init__ asserts that path has the distributed optimizer.
        raise ConfigError(f"{where}: key 'train.optimizer_cpu_offload' needs parallel.distributed_optimizer: true "
                          "(megatron-core offloads through its precision-aware distributed optimizer)")
    if cfg.rollout.max_staleness > 0 and cfg.placement.mode == "colocated":
        # train/rollout_pipeline.py samples while the policy steps; colocated servers have released
        # their memory to the step by then (rollout/resilient_engine.py released_for_step)
        raise ConfigError(f"{where}: key 'rollout.max_staleness' is {cfg.rollout.max_staleness} with placement.mode "
                          "colocated: colocated servers give their memory to the policy step, so they cannot sample "
                          "while it runs; use max_staleness: 0 or placement.mode: disaggregated")
    if t.updates_per_rollout < 1:   # train/loop.py run(): the updates of one rollout batch
        raise ConfigError(f"{where}: key 'train.updates_per_rollout' must be >= 1, got {t.updates_per_rollout}")
    if not 0 <= cfg.algorithm.grpo.beta_kl < float("inf"):   # train/step.py: k3 KL to the reference
        raise ConfigError(f"{where}: key 'algorithm.grpo.beta_kl' must be >= 0, got {cfg.algorithm.grpo.beta_kl}")
    if cfg.algorithm.popo.predictor_dtype == "fp32" and cfg.model.dtype != "float32" and t.save_interval > 0:
        # Measured (TP=1 x DP=2, bf16 tiny Qwen2): the step trains, save_checkpoint fails in megatron-core
        # 0.16.1 -- distributed optimizer: get_parameter_state_dp_zero size mismatch; plain optimizer:
        # "Optimizer shape ... does not match model shape" (fp32_from_fp16_params misaligned).
        raise ConfigError(f"{where}: key 'algorithm.popo.predictor_dtype' is fp32 in a {cfg.model.dtype} model: "
                          "megatron-core 0.16.1 cannot checkpoint an optimizer whose chunks mix 16-bit and fp32 "
                          "parameters; use predictor_dtype: model (the optimizer still keeps fp32 master weights) "
                          "or train.save_interval: 0")


def _check_eval(e: EvalConfig, where: str) -> None:
    """The eval section (popo_mega/train/benchmark_eval.py reads it): benchmark names are those
    popo-eval knows (a typo would otherwise fail only at the first evaluation, hours in)."""
    from popo_mega.eval.suite import benchmark_names

    known = benchmark_names()
    for i, name in enumerate(e.benchmarks):
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"{where}: key 'eval.benchmarks[{i}]' is {name!r}, not a benchmark{hint}; "
                              f"known: {', '.join(known)}")
    dup = sorted({b for b in e.benchmarks if e.benchmarks.count(b) > 1})
    if dup:
        raise ConfigError(f"{where}: key 'eval.benchmarks' lists {', '.join(dup)} more than once")
    for key, value, low in (("interval", e.interval, 0), ("n", e.n, 1), ("max_new_tokens", e.max_new_tokens, 1)):
        if value < low:
            raise ConfigError(f"{where}: key 'eval.{key}' must be >= {low}, got {value}")
    if e.limit is not None and e.limit < 1:
        raise ConfigError(f"{where}: key 'eval.limit' must be >= 1 (or null: every problem), got {e.limit}")
    if not 0 <= e.temperature < math.inf:   # NaN fails too
        raise ConfigError(f"{where}: key 'eval.temperature' must be >= 0 (0: greedy), got {e.temperature}")


def load_config(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config file and apply ``key.sub=value`` overrides."""
    path = os.fspath(path)
    try:
        with open(path) as f:
            raw = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(raw).__name__}")
    return config_from_dict(raw, source=path, overrides=overrides)


def read_hf_config(hf_path: str, where: str = "model.hf_path") -> dict:
    """The ``config.json`` of an HF model directory, with a clear error naming the key if missing and
    the file if it is not a JSON object."""
    cfg_file = os.path.join(hf_path, "config.json")
    if not os.path.isfile(cfg_file):
        raise ConfigError(f"{where}: no config.json in '{hf_path}'")
    try:
        with open(cfg_file) as f:
            hf = json.load(f)
    except (OSError, ValueError) as e:   # ValueError: JSONDecodeError and undecodable bytes
        raise ConfigError(f"{where}: {cfg_file} is not readable JSON ({type(e).__name__}: {e})") from None
    if not isinstance(hf, dict):
        raise ConfigError(f"{where}: {cfg_file} must hold a JSON object, got {type(hf).__name__}")
    return hf


def check_layout(cfg: Config, world_size: int | None = None, hf_config: dict | None = None) -> None:
    """Reject a parallel layout the model or the launch cannot have; errors name the key and file.

    heads (and KV groups) must divide by ``parallel.tensor``; layers by ``parallel.pipeline``; the
    world size by ``parallel.tensor * parallel.pipeline``; sequence parallelism needs ``parallel.tensor > 1``.
    ``parallel.expert`` needs a mixture-of-experts model whose experts it divides, and divides the
    data-parallel size (world / (tensor * pipeline)): expert-parallel ranks are data-parallel ranks.
    A mixture-of-experts model at ``parallel.tensor > 1`` needs sequence parallelism.
    """
    where = cfg.source
    tp, pp = cfg.parallel.tensor, cfg.parallel.pipeline
    if tp < 1:
        raise ConfigError(f"{where}: key 'parallel.tensor' must be >= 1, got {tp}")
    if pp < 1:
        raise ConfigError(f"{where}: key 'parallel.pipeline' must be >= 1, got {pp}")
    if cfg.parallel.sequence_parallel and tp == 1:   # megatron: "Cannot use sequence parallelism without TP"
        raise ConfigError(f"{where}: key 'parallel.sequence_parallel' needs parallel.tensor > 1 (it splits the "
                          "sequence over the tensor-parallel ranks); set parallel.sequence_parallel=false")
    if hf_config is None and cfg.model.hf_path:
        hf_config = read_hf_config(cfg.model.hf_path)
    ep = cfg.parallel.expert
    if ep < 1:
        raise ConfigError(f"{where}: key 'parallel.expert' must be >= 1, got {ep}")
    if hf_config is not None:
        experts = hf_config.get("num_experts", hf_config.get("num_local_experts")) or 0
        if ep > 1 and not experts:
            raise ConfigError(f"{where}: key 'parallel.expert' = {ep} needs a mixture-of-experts model; "
                              f"{cfg.model.hf_path}/config.json ({hf_config.get('model_type')}) has no experts")
        if experts and experts % ep:
            raise ConfigError(f"{where}: key 'parallel.expert' = {ep} does not divide the model's "
                              f"{experts} experts ({cfg.model.hf_path}/config.json)")
        if experts and tp > 1 and not cfg.parallel.sequence_parallel:   # megatron's MoELayer refuses to train so
            raise ConfigError(f"{where}: key 'parallel.sequence_parallel' must be true for a mixture-of-experts "
                              f"model at parallel.tensor = {tp} (megatron-core's MoE layer refuses to train "
                              "with tensor parallelism without it)")
        heads = hf_config["num_attention_heads"]
        groups = hf_config.get("num_key_value_heads") or heads
        layers = hf_config["num_hidden_layers"]
        if heads % tp:
            raise ConfigError(f"{where}: key 'parallel.tensor' = {tp} does not divide the model's "
                              f"{heads} attention heads ({cfg.model.hf_path}/config.json)")
        if groups % tp:
            raise ConfigError(f"{where}: key 'parallel.tensor' = {tp} does not divide the model's "
                              f"{groups} key/value heads ({cfg.model.hf_path}/config.json)")
        if layers % pp:
            raise ConfigError(f"{where}: key 'parallel.pipeline' = {pp} does not divide the model's "
                              f"{layers} layers ({cfg.model.hf_path}/config.json)")
    if world_size is not None and world_size % (tp * pp):
        raise ConfigError(f"{where}: world size {world_size} is not divisible by parallel.tensor x "
                          f"parallel.pipeline = {tp} x {pp}")
    if world_size is not None and (world_size // (tp * pp)) % ep:
        raise ConfigError(f"{where}: key 'parallel.expert' = {ep} does not divide the data-parallel size "
                          f"{world_size // (tp * pp)} (world {world_size} / tensor {tp} / pipeline {pp})")
    if cfg.model.fp8 is not None and cfg.model.transformer_impl == "local":
        raise ConfigError(f"{where}: key 'model.fp8' needs model.transformer_impl: transformer_engine or auto")
