// The popo_mega operator library: one schema per kernel and direction. CPU implementations are
// registered in cpu_bindings.cpp, CUDA ones in cuda/cuda_bindings.cpp (CUDA builds only); fake
// (meta) implementations and autograd are registered from Python in popo_mega/ops/_extension.py.
#include <Python.h>
#include <torch/library.h>

// `import popo_mega._C` loads this shared library, which runs the registrations below.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(popo_mega, m) {
  // Kernel 1: stats [4, T] fp32 = (max, sum exp(z-max), sum exp(z-max)(z-max), target logit) over the
  // shard's columns with global id < vocab_size (the rest is vocabulary padding: skipped, grad 0).
  m.def("logprob_entropy_stats(Tensor logits, Tensor target, int vocab_start, int vocab_size) -> Tensor");
  m.def("logprob_entropy_grad(Tensor logits, Tensor target, int vocab_start, int vocab_size, Tensor logz, "
        "Tensor entropy, Tensor grad_logp, Tensor grad_entropy) -> Tensor");
  // Kernel 2: (loss [N], stats [4] = clip_low_count, clip_high_count, rho_sum, token_count).
  m.def("clipped_surrogate(Tensor logp, Tensor old_logp, Tensor advantages, Tensor mask, float eps_low, "
        "float eps_high) -> (Tensor, Tensor)");
  m.def("clipped_surrogate_grad(Tensor grad_loss, Tensor logp, Tensor old_logp, Tensor advantages, "
        "Tensor mask, float eps_low, float eps_high) -> Tensor");
  // Kernel 3: masked mean pooling over packed segments, and the weighted cosine penalty.
  m.def("masked_mean_pool(Tensor hidden, Tensor cu_seqlens, Tensor mask) -> Tensor");
  m.def("masked_mean_pool_grad(Tensor grad_out, Tensor cu_seqlens, Tensor mask) -> Tensor");
  m.def("cosine_penalty(Tensor pred, Tensor target, Tensor weights, Tensor normaliser) -> Tensor");
  m.def("cosine_penalty_grad(Tensor grad_loss, Tensor pred, Tensor target, Tensor weights, "
        "Tensor normaliser) -> Tensor");
}
