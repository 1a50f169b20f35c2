"""Prepaid credits and exact usage metering for the LiteLLM proxy."""

from .errors import CreditsError
from .ledger import Account, Ledger, Transaction, UsageRecord
from .money import format_credits, parse_credits
from .pricing import ModelPrice, Pricing, Usage
from .settings import CreditsConfig, Settings

__version__ = "0.1.0"

__all__ = [
    "Account",
    "CreditsConfig",
    "CreditsError",
    "Ledger",
    "ModelPrice",
    "Pricing",
    "Settings",
    "Transaction",
    "Usage",
    "UsageRecord",
    "__version__",
    "format_credits",
    "parse_credits",
]
