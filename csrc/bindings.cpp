// Registration of the popo_mega operator library. Kernels are added per file under csrc/cpu and
// csrc/cuda; this file only declares the library so that an empty build still loads.
#include <torch/library.h>

TORCH_LIBRARY(popo_mega, m) {}
