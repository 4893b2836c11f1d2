"""Find the blocks of consecutive decoder layers a causal LM can lose.

Layers are 0-based and blocks half-open, ``[start, end)`` (see ``ranges``).
"""

from .errors import UserError
from .metrics import DEFAULT_METRIC, METRICS, Metric, get_metric
from .ranges import kept_ranges, parse_layers
from .scan import ScanResult, ScanSettings, scan_model

__all__ = ["scan_model", "ScanSettings", "ScanResult", "METRICS", "Metric", "get_metric", "DEFAULT_METRIC", "UserError",
           "kept_ranges", "parse_layers"]
