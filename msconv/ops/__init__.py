"""Op schemas, backend choice, autograd and fake registrations, and the functional API."""
from msconv.ops._backend import BACKENDS, available_backends, resolve as resolve_backend
from msconv.ops.mf_jets import mf_jets, mf_jets_adjoint
from msconv.ops.transfer import prolong, pyramid, restrict
from msconv.ops.transfer3d import prolong3d, pyramid3d, restrict3d

__all__ = ["BACKENDS", "available_backends", "resolve_backend", "restrict", "prolong", "pyramid", "restrict3d", "prolong3d", "pyramid3d", "mf_jets", "mf_jets_adjoint"]
