"""Static subnet variables <-> the original static PyTorch model's state_dict (SPEC.md §5.3).

The static JAX tree (from `models.extract.extract_subnet`) has the supernet's layout at the
subnet's real shapes with blocks renumbered over the active ones; the PyTorch side is what the
original `get_active_subnet(...).state_dict()` holds (372 keys for A0): no `module.` prefix, no
`bn_tracking`, 5 keys per BN, `last_conv.0.*` for the final expand and `last_conv.2.*` for the
feature mix, and every `num_batches_tracked` a fresh int64 0 (the export does not copy it).
`torch_model.StaticSubnet(space, cfg)` loads the result with `load_state_dict(strict=True)`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from alphanet_jax import space as space_lib
from alphanet_jax.convert import supernet
from alphanet_jax.models import extract


def static_entries(space: space_lib.SearchSpace, cfg: space_lib.SubnetConfig
                   ) -> list[supernet.Entry]:
  """The static subnet's state_dict entries, in the original static model's order."""
  blocks = tuple(supernet.NetBlock(index=b.j, cin=b.cin, mid=b.mid, cout=b.cout, se=b.se,
                                 kernel=b.kernel, has_expand=b.has_expand)
                 for b in extract.static_blocks(space, cfg))
  c7 = cfg.width[7]
  net = supernet.NetShape(stem=cfg.width[0], blocks=blocks, final_expand_in=c7,
                      final_expand=space.head_expand_ratio * c7, feature_mix=cfg.width[8],
                      num_classes=space.num_classes)
  return supernet.build_entries(net, supernet=False)


def static_variable_shapes(space: space_lib.SearchSpace, cfg: space_lib.SubnetConfig
                           ) -> dict[str, Any]:
  """`{'params', 'batch_stats'}` of the static subnet's JAX shapes (tuples)."""
  return supernet.variable_shapes(static_entries(space, cfg))


def static_to_torch(static_variables: Mapping[str, Any], space: space_lib.SearchSpace,
                    cfg: space_lib.SubnetConfig):
  """Static JAX variables -> `OrderedDict[str, torch.Tensor]` of the original static model.

  Args:
    static_variables: `{'params', 'batch_stats'}` of the subnet (numpy or jax arrays), e.g.
      `extract_subnet(space, cfg, supernet_variables)`.
    space: the search space.
    cfg: the subnet.

  Returns:
    The state_dict, float32 tensors plus int64 0-dim `num_batches_tracked` counters set to 0.

  Raises:
    CheckpointError: a missing or mis-shaped variable (named, with both shapes).
  """
  # extras=None: the counters start fresh at 0, as the original export (SPEC §5.3).
  return supernet.to_torch(static_variables, static_entries(space, cfg), None,
                           what="static subnet variables")


def torch_to_static(state_dict: Mapping[str, Any], space: space_lib.SearchSpace,
                    cfg: space_lib.SubnetConfig, *, strict: bool = True) -> dict[str, Any]:
  """The original static model's state_dict -> static JAX variables (numpy arrays).

  Args:
    state_dict: the static subnet's tensors (a `module.` prefix is dropped).
    space: the search space.
    cfg: the subnet the state_dict was exported for.
    strict: reject keys the subnet does not have.

  Raises:
    CheckpointError: a missing, unexpected or mis-shaped key (named, with both shapes).
  """
  variables, _ = supernet.from_torch(state_dict, static_entries(space, cfg), strict=strict,
                                     what="static subnet state_dict")
  return variables
