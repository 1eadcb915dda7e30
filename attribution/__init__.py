"""Attribution analyses. Importing the package registers every one of them (``interp.analysis.REGISTRY``)."""
from . import saliency, step_saliency, shapley  # noqa: F401
