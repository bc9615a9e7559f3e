"""PathWeave: adapter-in-adapter modality extension."""

from .config import PathWeaveConfig
from .layer import PathWeaveLayer
from .model import PathWeaveModel

__all__ = ["PathWeaveConfig", "PathWeaveLayer", "PathWeaveModel"]
