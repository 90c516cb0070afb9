"""The bitsandbytes serialization quirks (key layout, quant-state JSON, quantization_config), in one place."""
from .config import quantization_config
from .state_dict import from_bnb_state_dict, quantized_prefixes, to_bnb_state_dict

__all__ = ["from_bnb_state_dict", "quantization_config", "quantized_prefixes", "to_bnb_state_dict"]
