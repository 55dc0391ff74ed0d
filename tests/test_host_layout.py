"""The host layouts' meshes (`parallel.layout_meshes`, `onto_mesh`).

"shared": updates and rollouts on one mesh; "split": the updates on the
first device alone, rollouts and evaluation on a data mesh over every
device. The experiment run in the split layout is checked against the
one-device run in tests/test_experiment.py.
"""

import jax
import numpy as np
import pytest

from rlax_llm.parallel import mesh as mesh_lib


def test_shared_layout_leaves_the_device_order_to_make_mesh(monkeypatch):
  # make_mesh given no devices lays a TPU slice out by its topology; the
  # shared layout must not take that away by passing jax.devices() itself.
  calls = []
  real = mesh_lib.make_mesh
  monkeypatch.setattr(mesh_lib, "make_mesh",
                      lambda shape=None, devices=None: calls.append(devices)
                      or real(shape, devices))
  mesh_lib.layout_meshes({"data": -1}, "shared")
  mesh_lib.layout_meshes({"data": -1}, "auto")
  assert calls == [None, None]
  devices = jax.devices()
  mesh_lib.layout_meshes({"data": -1}, "shared", devices)
  assert calls[-1] == devices


def test_layout_meshes_on_one_device():
  shared = mesh_lib.layout_meshes({"data": -1}, "shared")
  assert shared[0] is shared[1] and shared[0].devices.size == len(
      jax.devices())
  update, rollout = mesh_lib.layout_meshes({"data": -1, "fsdp": 1}, "split")
  assert list(update.devices.flat) == jax.devices()[:1]
  assert dict(rollout.shape) == {"data": len(jax.devices()), "fsdp": 1,
                                 "tensor": 1}
  with pytest.raises(ValueError, match="host layout 'both' is not one of"):
    mesh_lib.layout_meshes(None, "both")
  # The updates' mesh of a split layout is one device.
  with pytest.raises(ValueError, match=r"host_layout='split' runs the updates "
                     r"on one device, and the mesh \{'data': 1, 'tensor': 2\}"):
    mesh_lib.layout_meshes({"data": 1, "tensor": 2}, "split")


@pytest.mark.parametrize("layout, shape, cpu, processes, devices, want", [
    ("auto", None, True, 1, 2, "split"),
    ("auto", {"data": -1, "fsdp": 1, "tensor": 1}, True, 1, 8, "split"),
    ("auto", None, True, 1, 1, "shared"),           # one device
    ("auto", None, False, 1, 8, "shared"),          # accelerators
    ("auto", None, True, 2, 2, "shared"),           # several processes
    ("auto", {"data": 1, "fsdp": 2}, True, 1, 2, "shared"),
    ("auto", {"data": -1, "tensor": 2}, True, 1, 4, "shared"),
    ("shared", None, True, 1, 2, "shared"),
    ("split", None, False, 1, 1, "split"),
])
def test_choose_layout(layout, shape, cpu, processes, devices, want):
  assert mesh_lib.choose_layout(layout, shape, cpu=cpu, processes=processes,
                                devices=devices) == want


def test_auto_layout_of_this_process():
  # The suite's processes have one CPU device: "auto" is "shared" there.
  assert len(jax.devices()) == 1
  update, rollout = mesh_lib.layout_meshes(None, "auto")
  assert update is rollout and list(update.devices.flat) == jax.devices()


def test_onto_mesh_moves_only_what_is_elsewhere():
  mesh = mesh_lib.make_mesh()
  here = jax.device_put(np.arange(6.0), mesh_lib.replicated(mesh))
  tree = {"a": here, "b": np.ones(3, np.float32)}
  out = mesh_lib.onto_mesh(tree, mesh)
  assert out["a"] is here  # already on the mesh: untouched
  assert isinstance(out["b"], jax.Array)
  assert out["b"].sharding == mesh_lib.replicated(mesh)
  np.testing.assert_array_equal(out["b"], tree["b"])
  # No mesh: the tree itself, nothing moved.
  assert mesh_lib.onto_mesh(tree, None) is tree
