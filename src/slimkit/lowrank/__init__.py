"""Low-rank factorization: truncated SVD of linear and convolution layers."""

from .svd import FactorizeConfig, factorize

__all__ = ["FactorizeConfig", "factorize"]
