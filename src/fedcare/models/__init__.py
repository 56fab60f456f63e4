"""Small torch models for clinical tabular data, with a flat parameter layout."""

from fedcare.models.params import FlatModel, ParamSpec, all_finite
from fedcare.models.tabular import MODELS, build_model

__all__ = ["MODELS", "FlatModel", "ParamSpec", "all_finite", "build_model"]
