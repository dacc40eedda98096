"""``sgl_kernel.quantization`` of the CUDA stand-in: the GGUF ops SGLang imports, not
implemented."""

from bacon_sglang.cpu_shim.cuda_standin import WHY
from bacon_sglang.cpu_shim.sgl_kernel_ops import not_implemented

NOT_IMPLEMENTED = ("ggml_dequantize", "ggml_moe_a8", "ggml_mul_mat_a8", "ggml_mul_mat_vec_a8")
for _name in NOT_IMPLEMENTED:
    globals()[_name] = not_implemented(_name, WHY)
