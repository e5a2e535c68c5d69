"""The Flax supernet, static subnets and their pure forward pass."""

import functools

import jax

from alphanet_jax.models.layers import BNMode
from alphanet_jax.models.network import (BlockLayout, NetLayout, forward, static_layout,
                                         supernet_layout)
from alphanet_jax.models.supernet import (Network, StaticSubnet, Supernet, init_variables,
                                          variables)

# One jitted entry point for every caller that wants the forward pass as a compiled program:
# the layout, resolution and modes are static, so programs are shared across subnets (masks are
# values) and bounded by (layout, resolution, mode, input shape).
forward_jit = jax.jit(
    forward, static_argnums=(0,),
    static_argnames=("resolution", "bn", "dropout_rate", "drop_connect_rate", "dw_impl",
                     "return_features"))

__all__ = [
    "BNMode", "BlockLayout", "NetLayout", "Network", "StaticSubnet", "Supernet", "forward",
    "forward_jit", "init_variables", "static_layout", "supernet_layout", "variables",
]
