// Op schemas of the compiled library. Kernels are registered per device in
// *_cpu.cpp and cuda/*_cuda.cpp; autograd, fake kernels and the
// public API live in Python (msconv/ops), as in pytorch/extension-cpp.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Importing msconv._C runs the static registrations below; the module itself is empty
// apart from the flags Python reads to report what was compiled in.
static PyModuleDef msconv_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) {
  PyObject* m = PyModule_Create(&msconv_module);
  if (m == nullptr) return nullptr;
#ifdef MSCONV_WITH_CUDA
  PyModule_AddIntConstant(m, "WITH_CUDA", 1);
#else
  PyModule_AddIntConstant(m, "WITH_CUDA", 0);
#endif
  return m;
}
}

TORCH_LIBRARY(msconv, m) {
  // Successive separable resamplings: level l+1 = A_y[l] · level l · A_x[l]^T, where the
  // 1-D operators are given as padded sparse rows (tap index, tap weight). Returns every
  // level after the input. Restriction, prolongation and their adjoints are all instances.
  //   x: (N, C, H, W); iy[l], wy[l]: (H_{l+1}, Ky) int32 / float32; ix[l], wx[l]: (W_{l+1}, Kx)
  m.def("resample2d_chain(Tensor x, Tensor[] iy, Tensor[] wy, Tensor[] ix, Tensor[] wx) -> Tensor[]");
  // The same for volumes: level l+1 = A_z[l] ⊗ A_y[l] ⊗ A_x[l] applied to level l (a factor-1
  // axis is an identity table). x: (N, C, D, H, W); iz[l], wz[l]: (D_{l+1}, Kz), and so on.
  m.def("resample3d_chain(Tensor x, Tensor[] iz, Tensor[] wz, Tensor[] iy, Tensor[] wy, Tensor[] ix, Tensor[] wx) -> Tensor[]");
  // Mesh-free convolution jets of a pre-padded field (msconv/reference.py:mf_jets_ref) and their
  // adjoint. xp: (N, C, Hp, Wp); filt: (order+1, K); out: (N, C*M, Ho, Wo), Ho = (Hp-K)//stride+1.
  // mf_jets_adj maps a gradient of that shape back to (N, C, hp, wp). Autograd, fake kernels and
  // the backend switch are in msconv/ops/mf_jets.py (op msconv::mf_jets).
  m.def("mf_jets_fwd(Tensor xp, Tensor filt, int order, int stride) -> Tensor");
  m.def("mf_jets_adj(Tensor grad, Tensor filt, int order, int stride, int hp, int wp) -> Tensor");
  // The whole stride-1 mesh-free convolution, jets and mix fused per row tile (no jets in
  // memory): x (N, C, H, W) unpadded, theta (C_out, C/groups, M), filt (order+1, K); `pad` rows
  // and columns before the image, the rest after (K-1 in all), per `mode` (0 zeros, 1 reflect,
  // 2 replicate, 3 circular). mf_conv_bwd returns (grad x, grad theta), each empty when not
  // asked for. Autograd and fake kernels: msconv/ops/mf_conv_fused.py (op msconv::mf_conv2d_fused).
  m.def("mf_conv_fwd(Tensor x, Tensor theta, Tensor? bias, Tensor filt, int order, int pad, int mode, int groups) -> Tensor");
  m.def("mf_conv_bwd(Tensor grad, Tensor x, Tensor theta, Tensor filt, int order, int pad, int mode, int groups, bool need_x, bool need_theta) -> (Tensor, Tensor)");
}
