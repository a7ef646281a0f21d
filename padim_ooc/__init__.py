"""padim_ooc: PaDiM anomaly detection fitted out of core, in constant memory."""
__version__ = "0.1.0"

from .errors import PadimError  # noqa: E402
from .config import ModelConfig  # noqa: E402
from .extractor import Extractor  # noqa: E402
from .api import calibrate_model, finalize_model, fit, merge, open_model, score_files  # noqa: E402
from .score import Model  # noqa: E402
from .compact import compact  # noqa: E402  the function: `padim_ooc.compact` is not the module

__all__ = ["Extractor", "Model", "ModelConfig", "PadimError", "calibrate_model", "compact", "finalize_model", "fit", "merge",
           "open_model", "score_files", "__version__"]
