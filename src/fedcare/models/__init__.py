"""Small torch models for clinical tabular data, with a flat parameter layout."""

from fedcare.models.params import FlatModel, ParamSpec
from fedcare.models.tabular import MODELS, build_model

__all__ = ["MODELS", "FlatModel", "ParamSpec", "build_model"]
