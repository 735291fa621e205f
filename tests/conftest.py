import os

import torch

# Triton kernels run on CPU tensors through the interpreter where there is no GPU; this must
# be set before triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Two cores: intra-op threads beyond that only add contention between pytest's own work.
torch.set_num_threads(min(torch.get_num_threads(), 2))

# Per-dtype (atol, rtol) for comparisons against the float64 reference.
TOL = {
    torch.float64: (1e-12, 1e-12),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (2e-2, 2e-2),
}
