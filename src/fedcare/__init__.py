"""fedcare: train one clinical model across hospitals without pooling patient records."""

from fedcare.errors import (
    BudgetExceeded,
    ConfigError,
    DataError,
    FedcareError,
    ProtocolError,
    QuorumError,
    SchemaError,
)

__version__ = "0.1.0"

__all__ = [
    "BudgetExceeded",
    "ConfigError",
    "DataError",
    "FedcareError",
    "ProtocolError",
    "QuorumError",
    "SchemaError",
    "__version__",
]
