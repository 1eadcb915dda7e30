"""interp: capture, analyse and intervene on transformer LMs, VLMs and diffusion LMs.

    import interp
    model = interp.load("smollm2")
    trace = interp.capture(model, "The capital of France is", sites="blocks.*.attn.pattern")
"""
from .capture import Entropy, KeyMass, QueryRow, Reducer, RoleMass, TopK, capture
from .errors import InterpError
from .evaluate import evaluate
from .finding import Finding
from .model import Model, load
from .patch import patch
from .roles import Batch, Roles
from .spec import Spec
from .trace import Trace

__version__ = "0.1.0"
__all__ = ["load", "Model", "capture", "Trace", "Roles", "Batch", "Reducer", "KeyMass", "RoleMass", "QueryRow",
           "Entropy", "TopK", "InterpError", "Finding", "Spec", "patch", "evaluate", "__version__"]
