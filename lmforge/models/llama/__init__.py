from lmforge.models.llama.model import Transformer, TransformerBlock, build_model, count_params
from lmforge.models.llama.sizes import SIZES, get_size

__all__ = ["SIZES", "Transformer", "TransformerBlock", "build_model", "count_params", "get_size"]
