"""Llama-style decoders, dense and Mixture-of-Experts: the modules (model.py), named sizes
(sizes.py) and the tensor-parallel plan (tp_plan.py)."""

from lmforge.models.family import ModelFamily
from lmforge.models.llama.model import Transformer, TransformerBlock, build_model, count_params
from lmforge.models.llama.sizes import SIZES, get_size

LLAMA = ModelFamily(name="llama", model_class=Transformer, build=build_model, count_params=count_params,
                    sizes=SIZES)

__all__ = ["LLAMA", "SIZES", "Transformer", "TransformerBlock", "build_model", "count_params", "get_size"]
