"""Format-agnostic quantization front end: randomized Hadamard transform, Hessian capture, BlockLDLQ."""
from .hadamard import (HADAMARD_KH_ORDER, dense_hadamard, had_transform, hadamard_factor,  # noqa: F401
                       is_supported_size, nearest_supported_sizes, random_signs, rht_hessian, rht_input,
                       rht_output, rht_weight, unrht_weight)
from .hessian import (HessianAccumulator, LayerHessians, capture_layer_hessians, check_hessian,  # noqa: F401
                      damp, decoder_backbone, iter_layer_hessians)
from .ldlq import LDLQResult, block_ldl, block_ldlq, nearest_rounding, proxy_loss  # noqa: F401
