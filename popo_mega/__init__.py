"""popo_mega: the Megatron-scale training backend for POPO (Positive-Only Policy Optimization).

Subpackages (see docs/architecture.md):
  config      YAML -> frozen typed dataclasses, one per component
  runtime     torch.distributed + megatron parallel_state, seeds, device; cpu_compat
  model       Megatron GPT builder for Qwen2/Qwen2.5/Llama-3, HF <-> Megatron, log-probs
  algorithms  POPO, GRPO, A3PO as pure functions; fp32 EMA; predictor
  ops         Python face of csrc/ kernels with pure-PyTorch reference twins
  rollout     engine interface, SGLang client, embedded server, weight sync
  rewards     math-verify grading, synthetic task
  data        datasets and prompt templates
  train       the RL loop, the policy step, checkpoints
  eval        pass@k / avg@k on the benchmark sets
"""

__version__ = "0.1.0"
