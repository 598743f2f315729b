"""lococomm: fault-tolerant, compressed, low-communication collectives for PyTorch training."""

from lococomm import presets
from lococomm.algorithms.data_parallel import DataParallel
from lococomm.algorithms.diloco import DiLoCo
from lococomm.algorithms.optimizer import Optimizer
from lococomm.algorithms.outer import OuterSGD
from lococomm.collectives.communicator import Handle
from lococomm.compress import codecs
from lococomm.ft.manager import Manager, StateLost, StepMetrics, StepRetriesExhausted
from lococomm.ft.state import TorchRNG
from lococomm.membership.client import AuthenticationError, CoordinatorUnavailable
from lococomm.membership.coordinator import Coordinator

__all__ = [
    "AuthenticationError",
    "Coordinator",
    "CoordinatorUnavailable",
    "DataParallel",
    "DiLoCo",
    "Handle",
    "codecs",
    "Manager",
    "Optimizer",
    "OuterSGD",
    "StepMetrics",
    "StateLost",
    "StepRetriesExhausted",
    "TorchRNG",
    "presets",
]
__version__ = "0.1.0"
