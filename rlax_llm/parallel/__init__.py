"""Device meshes and logical-axis sharding rules."""

from rlax_llm.parallel.mesh import DEFAULT_RULES
from rlax_llm.parallel.mesh import MESH_AXES
from rlax_llm.parallel.mesh import batch_sharding
from rlax_llm.parallel.mesh import logical_to_spec
from rlax_llm.parallel.mesh import make_mesh
from rlax_llm.parallel.mesh import replicated
from rlax_llm.parallel.mesh import tree_shardings

__all__ = ["DEFAULT_RULES", "MESH_AXES", "batch_sharding", "logical_to_spec",
           "make_mesh", "replicated", "tree_shardings"]
