"""Forward-pass analyses. Importing the package registers every one of them (``interp.analysis.REGISTRY``)."""
from . import (act, dape, dla, eah, edar, entropy, geometry, gift, image_attention, induction,  # noqa: F401
               knockout, linear, logit_lens, massive, pai, patching, retrieval, routes, secondary_sinks, sinks,
               tokentruth, vhd, visual_sinks, vista, zerotuning)
