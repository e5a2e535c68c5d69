"""PyTorch interop: the original checkpoints <-> JAX variables, and a pure-PyTorch static subnet.

  torch_io     safe loading of `.pth` / `.pth.tar` (never executes pickled code), saving
  supernet     supernet state_dict (1468 keys) <-> {'params', 'batch_stats'} + extras
  static       static subnet state_dict (e.g. 372 keys for A0) <-> static variables
  torch_model  `StaticSubnet`: the static subnet as a torch `nn.Module`
  cli          `python -m alphanet_jax.convert.cli to-orbax | to-pytorch`

torch is an optional dependency: it is imported only inside functions (and by `torch_model`),
so `import alphanet_jax.convert.supernet` works without it.
"""
