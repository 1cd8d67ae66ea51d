"""The names the user's docs import from `core.utils`; each lives in the module that owns it.

    from core.utils import compute_weight_spectral_norms, SimpleLogger, TrainingMonitor
"""
from core.logger import NullLogger, SimpleLogger
from core.monitor import TrainingMonitor
from core.spectral import compute_weight_spectral_norms

__all__ = ["SimpleLogger", "NullLogger", "TrainingMonitor", "compute_weight_spectral_norms"]
