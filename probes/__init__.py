"""Forward-pass analyses. Importing the package registers every one of them (``interp.analysis.REGISTRY``)."""
from . import sinks  # noqa: F401
from . import knockout, linear, logit_lens  # noqa: F401
from . import dla  # noqa: F401
from . import image_attention, vhd, visual_sinks  # noqa: F401
from . import patching  # noqa: F401
from . import massive, entropy, secondary_sinks  # noqa: F401
from . import routes  # noqa: F401
