"""Attribution analyses. Importing the package registers every one of them (``interp.analysis.REGISTRY``)."""
from . import saliency, step_saliency, shapley  # noqa: F401
from . import cam, diffusion_cam  # noqa: F401
from . import atp  # noqa: F401
from . import eap  # noqa: F401
