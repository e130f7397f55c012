"""apex_mini: a pure-PyTorch reference implementation of hybrid CPU-GPU LLM inference."""
from .config import EngineConfig, ModelConfig
from .llm import LLM, RequestOutput
from .sampling import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "EngineConfig", "ModelConfig"]
__version__ = "0.1.0"
