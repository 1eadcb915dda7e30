"""Forward-pass analyses. Importing the package registers every one of them (``interp.analysis.REGISTRY``)."""
from . import (dla, entropy, image_attention, induction, knockout, linear, logit_lens, massive, patching,  # noqa: F401
               routes, secondary_sinks, sinks, vhd, visual_sinks)
from . import geometry, retrieval  # noqa: F401,E402
from . import eah, gift  # noqa: F401,E402
from . import pai, vista  # noqa: F401,E402
from . import dape, edar, tokentruth  # noqa: F401,E402
from . import act, zerotuning  # noqa: F401,E402
