"""Device meshes, logical-axis sharding rules and multi-process start-up."""

from rlax_llm.parallel.distributed import HOST_LAYOUTS
from rlax_llm.parallel.distributed import Plan
from rlax_llm.parallel.distributed import accelerator_plugins
from rlax_llm.parallel.distributed import global_batch_to_devices
from rlax_llm.parallel.distributed import host_core_count
from rlax_llm.parallel.distributed import host_local_to_global
from rlax_llm.parallel.distributed import initialize
from rlax_llm.parallel.distributed import is_primary
from rlax_llm.parallel.distributed import process_batch_indices
from rlax_llm.parallel.distributed import process_batch_slice
from rlax_llm.parallel.distributed import reuse_host_memory
from rlax_llm.parallel.distributed import use_host_devices
from rlax_llm.parallel.mesh import DEFAULT_RULES
from rlax_llm.parallel.mesh import MESH_AXES
from rlax_llm.parallel.mesh import SAMPLE_RULES
from rlax_llm.parallel.mesh import TRAIN_RULES
from rlax_llm.parallel.mesh import batch_sharding
from rlax_llm.parallel.mesh import batch_size_multiple
from rlax_llm.parallel.mesh import choose_layout
from rlax_llm.parallel.mesh import get_rules
from rlax_llm.parallel.mesh import layout_meshes
from rlax_llm.parallel.mesh import logical_constraint
from rlax_llm.parallel.mesh import logical_sharding
from rlax_llm.parallel.mesh import logical_to_spec
from rlax_llm.parallel.mesh import make_mesh
from rlax_llm.parallel.mesh import onto_mesh
from rlax_llm.parallel.mesh import replicated
from rlax_llm.parallel.mesh import tree_shardings
from rlax_llm.parallel.mesh import unsharded_leaves

__all__ = [
    "DEFAULT_RULES", "HOST_LAYOUTS", "MESH_AXES", "Plan", "SAMPLE_RULES",
    "TRAIN_RULES", "accelerator_plugins", "batch_sharding",
    "batch_size_multiple", "choose_layout", "get_rules",
    "global_batch_to_devices", "host_core_count", "host_local_to_global",
    "initialize", "is_primary", "layout_meshes", "logical_constraint",
    "logical_sharding", "logical_to_spec", "make_mesh", "onto_mesh",
    "process_batch_indices", "process_batch_slice", "replicated",
    "reuse_host_memory", "tree_shardings", "unsharded_leaves",
    "use_host_devices",
]
