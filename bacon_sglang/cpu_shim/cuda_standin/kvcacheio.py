"""``sgl_kernel.kvcacheio`` of the CUDA stand-in: the host-KV transfer ops SGLang imports
(hierarchical cache only), not implemented."""

from bacon_sglang.cpu_shim.cuda_standin import WHY
from bacon_sglang.cpu_shim.sgl_kernel_ops import not_implemented

NOT_IMPLEMENTED = (
    "get_device_accessible_ptr transfer_embedding_ranges_direct transfer_kv_all_layer "
    "transfer_kv_all_layer_direct_lf_pf transfer_kv_all_layer_lf_pf transfer_kv_all_layer_lf_ph "
    "transfer_kv_all_layer_mla transfer_kv_all_layer_mla_lf_pf transfer_kv_direct "
    "transfer_kv_per_layer transfer_kv_per_layer_direct_pf_lf transfer_kv_per_layer_mla "
    "transfer_kv_per_layer_mla_pf_lf transfer_kv_per_layer_pf_lf transfer_kv_per_layer_ph_lf"
).split()
for _name in NOT_IMPLEMENTED:
    globals()[_name] = not_implemented(_name, WHY)
