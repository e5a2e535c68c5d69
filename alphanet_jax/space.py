"""The search space and subnet configurations.

A `SearchSpace` is the original `supernet_config` (resolutions, first_conv, mb1..mb7, last_conv)
as frozen data, plus everything derived from it that the model needs at build time: the per-block
maximum shapes (SPEC.md §5.2) and which shortcut each block can take. A `SubnetConfig` is one
point of the space in the original's keys (`resolution`, `width`[9], `depth`[7],
`kernel_size`[7], `expand_ratio`[7]).

Sampling operators take a `numpy.random.Generator`; the trainer seeds one from (seed, step) so
every host draws the same subnets, also after a resume.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

STAGE_NAMES = ("mb1", "mb2", "mb3", "mb4", "mb5", "mb6", "mb7")
LIST_FIELDS = ("width", "depth", "kernel_size", "expand_ratio")
FIELDS = ("resolution",) + LIST_FIELDS


def make_divisible(value: float, divisor: int = 8, min_value: int = 1) -> int:
  """AttentiveNAS `make_divisible`: round to a multiple of `divisor`, never below 90%."""
  new_value = max(min_value, int(value + divisor / 2) // divisor * divisor)
  if new_value < 0.9 * value:
    new_value += divisor
  return int(new_value)


def mid_channels(in_channels: int, expand_ratio: float) -> int:
  """Hidden width of an MBConv block: md(round(cin * e)), as the original's dynamic layers."""
  return make_divisible(round(in_channels * expand_ratio), 8)


def se_channels(mid: int) -> int:
  """Squeeze-excite hidden width: md(mid // 4)."""
  return make_divisible(mid // 4, 8)


@dataclasses.dataclass(frozen=True)
class StageSpace:
  """Candidate lists of one MBConv stage, in the original's order."""
  name: str
  widths: tuple[int, ...]
  depths: tuple[int, ...]
  kernel_sizes: tuple[int, ...]
  expand_ratios: tuple[int, ...]
  stride: int
  se: bool


@dataclasses.dataclass(frozen=True)
class BlockSpec:
  """Static facts of one supernet block (SPEC.md §5.2)."""
  index: int            # 0..num_blocks-1 over the whole network
  stage: int            # 0..6
  index_in_stage: int
  stride: int
  max_in: int
  max_mid: int
  max_out: int
  se_max: int           # 0 when the stage has no SE
  has_expand: bool      # False when the stage's max expand ratio is 1 (mb1)
  max_kernel: int
  # 'identity': never a conv (non-first blocks); 'conv': always a conv (width lists disjoint);
  # 'maybe': a conv exactly when the chosen cin != cout.
  shortcut: str

  @property
  def first_in_stage(self) -> bool:
    return self.index_in_stage == 0


@dataclasses.dataclass(frozen=True)
class Gene:
  """One draw of the sampler: `field` (and `index` for list fields) with its candidates."""
  field: str
  index: int | None
  choices: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class SubnetConfig:
  """One subnet, in the original's JSON keys."""
  resolution: int
  width: tuple[int, ...]
  depth: tuple[int, ...]
  kernel_size: tuple[int, ...]
  expand_ratio: tuple[int, ...]

  def __post_init__(self):
    for name in LIST_FIELDS:
      object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
    object.__setattr__(self, "resolution", int(self.resolution))

  def to_dict(self) -> dict[str, Any]:
    return {"resolution": self.resolution, **{f: list(getattr(self, f)) for f in LIST_FIELDS}}

  def to_json(self) -> str:
    return json.dumps(self.to_dict())

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "SubnetConfig":
    missing = [f for f in FIELDS if f not in d]
    extra = [k for k in d if k not in FIELDS]
    if missing or extra:
      raise ValueError(f"A subnet config needs exactly the keys {list(FIELDS)}; "
                       f"missing {missing}, unexpected {extra}.")
    resolution = d["resolution"]
    if isinstance(resolution, Sequence):  # the original's JSON sometimes stores [r]
      resolution = resolution[0]
    return cls(resolution=resolution, **{f: d[f] for f in LIST_FIELDS})

  @classmethod
  def from_json(cls, text: str) -> "SubnetConfig":
    return cls.from_dict(json.loads(text))

  def replace(self, **kwargs) -> "SubnetConfig":
    return dataclasses.replace(self, **kwargs)


@dataclasses.dataclass(frozen=True)
class SearchSpace:
  """A 7-stage AttentiveNAS search space with the v3 head."""
  resolutions: tuple[int, ...]
  stem_widths: tuple[int, ...]
  stages: tuple[StageSpace, ...]
  last_widths: tuple[int, ...]
  num_classes: int = 1000
  stem_stride: int = 2
  head_expand_ratio: int = 6   # final_expand width = 6 x mb7 width

  def __post_init__(self):
    if len(self.stages) != len(STAGE_NAMES):
      raise ValueError(f"A search space has {len(STAGE_NAMES)} stages, got {len(self.stages)}.")
    for stage in self.stages:
      for name in ("widths", "depths", "kernel_sizes", "expand_ratios"):
        if not getattr(stage, name):
          raise ValueError(f"Stage {stage.name}: empty candidate list '{name}'.")
      if any(k % 2 != 1 for k in stage.kernel_sizes):
        raise ValueError(f"Stage {stage.name}: kernel sizes must be odd, got {stage.kernel_sizes}.")
      if min(stage.depths) < 1:
        raise ValueError(f"Stage {stage.name}: depths must be >= 1, got {stage.depths}.")
      if 1 in stage.expand_ratios and set(stage.expand_ratios) != {1}:
        # The supernet has an expand conv iff the stage's max ratio != 1; a static block iff its
        # ratio != 1. Mixing 1 with larger ratios would make the two disagree.
        raise ValueError(f"Stage {stage.name}: expand ratios must be all 1 or all > 1, got "
                         f"{stage.expand_ratios}.")

  # --------------------------------------------------------------------------- construction
  @classmethod
  def from_supernet_config(cls, cfg: Mapping[str, Any], num_classes: int = 1000) -> "SearchSpace":
    """Builds a space from the original's `supernet_config` dict (YAML layout)."""
    try:
      stages = tuple(
          StageSpace(name=name, widths=tuple(cfg[name]["c"]), depths=tuple(cfg[name]["d"]),
                     kernel_sizes=tuple(cfg[name]["k"]), expand_ratios=tuple(cfg[name]["t"]),
                     stride=int(cfg[name]["s"]), se=bool(cfg[name]["se"]))
          for name in STAGE_NAMES)
      return cls(resolutions=tuple(cfg["resolutions"]), stem_widths=tuple(cfg["first_conv"]["c"]),
                 stages=stages, last_widths=tuple(cfg["last_conv"]["c"]),
                 num_classes=int(num_classes),
                 stem_stride=int(cfg["first_conv"].get("s", 2)))
    except KeyError as e:
      raise ValueError(f"supernet_config is missing {e}; it needs 'resolutions', 'first_conv', "
                       f"{', '.join(STAGE_NAMES)} and 'last_conv'.") from None

  def to_supernet_config(self) -> dict[str, Any]:
    out: dict[str, Any] = {"resolutions": list(self.resolutions),
                           "first_conv": {"c": list(self.stem_widths), "s": self.stem_stride}}
    for st in self.stages:
      out[st.name] = {"c": list(st.widths), "d": list(st.depths), "k": list(st.kernel_sizes),
                      "t": list(st.expand_ratios), "s": st.stride, "se": st.se}
    out["last_conv"] = {"c": list(self.last_widths)}
    return out

  # --------------------------------------------------------------------------- derived shapes
  @property
  def width_choices(self) -> tuple[tuple[int, ...], ...]:
    """Candidates of the 9 width entries: first_conv, mb1..mb7, last_conv."""
    return (self.stem_widths,) + tuple(s.widths for s in self.stages) + (self.last_widths,)

  @property
  def block_group_info(self) -> tuple[tuple[int, ...], ...]:
    groups, start = [], 0
    for st in self.stages:
      n = max(st.depths)
      groups.append(tuple(range(start, start + n)))
      start += n
    return tuple(groups)

  @property
  def num_blocks(self) -> int:
    return sum(max(s.depths) for s in self.stages)

  @property
  def blocks(self) -> tuple[BlockSpec, ...]:
    """Per-block maximum shapes, allocated exactly as the original (no rounding of max_mid)."""
    out = []
    prev_widths = self.stem_widths
    b = 0
    for si, st in enumerate(self.stages):
      for i in range(max(st.depths)):
        in_widths = prev_widths if i == 0 else st.widths
        stride = st.stride if i == 0 else 1
        max_in = max(in_widths)
        max_mid = round(max_in * max(st.expand_ratios))
        if stride == 1 and set(in_widths) <= set(st.widths) and i > 0:
          shortcut = "identity"
        elif set(in_widths) & set(st.widths):
          shortcut = "maybe"
        else:
          shortcut = "conv"
        out.append(BlockSpec(
            index=b, stage=si, index_in_stage=i, stride=stride, max_in=max_in,
            max_mid=max_mid, max_out=max(st.widths),
            se_max=se_channels(max_mid) if st.se else 0,
            has_expand=max(st.expand_ratios) != 1, max_kernel=max(st.kernel_sizes),
            shortcut=shortcut))
        b += 1
      prev_widths = st.widths
    return tuple(out)

  @property
  def max_final_expand(self) -> int:
    return self.head_expand_ratio * max(self.stages[-1].widths)

  # --------------------------------------------------------------------------- genes
  @property
  def genes(self) -> tuple[Gene, ...]:
    """All genes in the original's draw order: resolution, width, depth, kernel, expand."""
    genes = [Gene("resolution", None, self.resolutions)]
    genes += [Gene("width", i, c) for i, c in enumerate(self.width_choices)]
    genes += [Gene("depth", i, s.depths) for i, s in enumerate(self.stages)]
    genes += [Gene("kernel_size", i, s.kernel_sizes) for i, s in enumerate(self.stages)]
    genes += [Gene("expand_ratio", i, s.expand_ratios) for i, s in enumerate(self.stages)]
    return tuple(genes)

  def _from_gene_values(self, values: Sequence[int]) -> SubnetConfig:
    d: dict[str, Any] = {f: [] for f in LIST_FIELDS}
    for gene, v in zip(self.genes, values):
      if gene.field == "resolution":
        d["resolution"] = v
      else:
        d[gene.field].append(v)
    return SubnetConfig.from_dict(d)

  @staticmethod
  def _gene_value(cfg: SubnetConfig, gene: Gene) -> int:
    v = getattr(cfg, gene.field)
    return v if gene.index is None else v[gene.index]

  # --------------------------------------------------------------------------- validation
  def validate(self, cfg: SubnetConfig) -> SubnetConfig:
    """Returns `cfg` if it lies in this space; otherwise raises a ValueError naming the gene."""
    expected = {"width": 9, "depth": 7, "kernel_size": 7, "expand_ratio": 7}
    for f, n in expected.items():
      if len(getattr(cfg, f)) != n:
        raise ValueError(f"Subnet field '{f}' needs {n} entries, got {len(getattr(cfg, f))}: "
                         f"{list(getattr(cfg, f))}.")
    width_names = ["first_conv"] + list(STAGE_NAMES) + ["last_conv"]
    for gene in self.genes:
      v = self._gene_value(cfg, gene)
      if v not in gene.choices:
        where = ""
        if gene.field == "width":
          where = f" (stage {width_names[gene.index]})"
        elif gene.index is not None:
          where = f" (stage {STAGE_NAMES[gene.index]})"
        idx = "" if gene.index is None else f"[{gene.index}]"
        raise ValueError(f"Subnet field '{gene.field}{idx}'{where} = {v} is outside the search "
                         f"space; allowed: {list(gene.choices)}.")
    return cfg

  def contains(self, cfg: SubnetConfig) -> bool:
    try:
      self.validate(cfg)
      return True
    except ValueError:
      return False

  # --------------------------------------------------------------------------- operators
  def min_subnet(self) -> SubnetConfig:
    return self._from_gene_values([min(g.choices) for g in self.genes])

  def max_subnet(self) -> SubnetConfig:
    return self._from_gene_values([max(g.choices) for g in self.genes])

  def sample(self, rng: np.random.Generator) -> SubnetConfig:
    """Uniform sample: one independent draw per gene, in draw order (single choices draw too)."""
    return self._from_gene_values(
        [g.choices[int(rng.integers(len(g.choices)))] for g in self.genes])

  def mutate(self, cfg: SubnetConfig, prob: float, rng: np.random.Generator) -> SubnetConfig:
    """Each gene, with probability `prob`, becomes a uniformly chosen *different* candidate."""
    values = []
    for g in self.genes:
      v = self._gene_value(cfg, g)
      if rng.random() < prob:
        others = [c for c in g.choices if c != v]
        if others:
          v = others[int(rng.integers(len(others)))]
      values.append(v)
    return self._from_gene_values(values)

  def crossover(self, a: SubnetConfig, b: SubnetConfig, rng: np.random.Generator,
                prob: float = 0.5) -> SubnetConfig:
    """Each gene is taken from `a` with probability `prob`, else from `b`."""
    return self._from_gene_values(
        [self._gene_value(a if rng.random() < prob else b, g) for g in self.genes])


# ------------------------------------------------------------------------------- the spaces
# AttentiveNAS / AlphaNet supernet_config (identical in all five original configs).
ALPHANET_SUPERNET_CONFIG = {
    "resolutions": [192, 224, 256, 288],
    "first_conv": {"c": [16, 24], "s": 2},
    "mb1": {"c": [16, 24], "d": [1, 2], "k": [3, 5], "t": [1], "s": 1, "se": False},
    "mb2": {"c": [24, 32], "d": [3, 4, 5], "k": [3, 5], "t": [4, 5, 6], "s": 2, "se": False},
    "mb3": {"c": [32, 40], "d": [3, 4, 5, 6], "k": [3, 5], "t": [4, 5, 6], "s": 2, "se": True},
    "mb4": {"c": [64, 72], "d": [3, 4, 5, 6], "k": [3, 5], "t": [4, 5, 6], "s": 2, "se": False},
    "mb5": {"c": [112, 120, 128], "d": [3, 4, 5, 6, 7, 8], "k": [3, 5], "t": [4, 5, 6], "s": 1,
            "se": True},
    "mb6": {"c": [192, 200, 208, 216], "d": [3, 4, 5, 6, 7, 8], "k": [3, 5], "t": [6], "s": 2,
            "se": True},
    "mb7": {"c": [216, 224], "d": [1, 2], "k": [3, 5], "t": [6], "s": 1, "se": True},
    "last_conv": {"c": [1792, 1984]},
}


def alphanet_space(num_classes: int = 1000) -> SearchSpace:
  return SearchSpace.from_supernet_config(ALPHANET_SUPERNET_CONFIG, num_classes)


def _cfg(r, w, k, t, d) -> SubnetConfig:
  return SubnetConfig(resolution=r, width=w, depth=d, kernel_size=k, expand_ratio=t)


# AlphaNet configs/eval_alphanet_models.yml `pareto_models` (SPEC.md §11.1).
ALPHANET_SUBNETS = {
    "a0": _cfg(192, (16, 16, 24, 32, 64, 112, 192, 216, 1792), (3, 3, 3, 3, 3, 3, 3),
               (1, 4, 4, 4, 4, 6, 6), (1, 3, 3, 3, 3, 3, 1)),
    "a1": _cfg(224, (16, 16, 24, 32, 64, 112, 192, 216, 1984), (3, 3, 3, 5, 3, 5, 3),
               (1, 4, 4, 4, 4, 6, 6), (1, 3, 3, 3, 3, 3, 1)),
    "a2": _cfg(224, (16, 16, 24, 32, 64, 112, 200, 224, 1984), (3, 3, 3, 3, 3, 5, 3),
               (1, 4, 5, 4, 4, 6, 6), (1, 3, 3, 3, 3, 4, 1)),
    "a3": _cfg(224, (16, 16, 24, 32, 64, 112, 208, 224, 1984), (3, 3, 3, 5, 3, 3, 3),
               (1, 4, 4, 4, 4, 6, 6), (2, 3, 3, 4, 3, 5, 1)),
    "a4": _cfg(256, (16, 16, 24, 32, 64, 112, 192, 216, 1984), (3, 3, 3, 5, 3, 5, 3),
               (1, 4, 4, 5, 4, 6, 6), (1, 3, 3, 4, 3, 5, 1)),
    "a5": _cfg(256, (16, 16, 24, 32, 64, 112, 208, 216, 1984), (3, 3, 3, 3, 3, 5, 3),
               (1, 4, 4, 5, 4, 6, 6), (1, 3, 3, 4, 4, 5, 1)),
    "a5_base": _cfg(288, (16, 16, 24, 32, 64, 112, 200, 216, 1984), (3, 3, 5, 5, 3, 3, 3),
                    (1, 4, 4, 4, 5, 6, 6), (2, 3, 4, 3, 3, 5, 1)),
    "a6": _cfg(288, (16, 16, 24, 32, 64, 112, 216, 224, 1984), (3, 3, 3, 3, 3, 5, 3),
               (1, 4, 6, 5, 4, 6, 6), (1, 3, 3, 4, 4, 6, 1)),
}
ALPHANET_ALIASES = {"a5_small": "a5", "a5_1": "a5_base"}

# AttentiveNAS configs/eval_attentive_nas_models.yml: a0-a4 and a6 equal AlphaNet's; a5 differs.
ATTENTIVENAS_SUBNETS = {name: ALPHANET_SUBNETS[name] for name in ("a0", "a1", "a2", "a3", "a4", "a6")}
ATTENTIVENAS_SUBNETS["a5"] = _cfg(256, (16, 16, 24, 32, 72, 112, 192, 216, 1792),
                                  (3, 3, 3, 5, 3, 3, 3), (1, 4, 5, 4, 4, 6, 6),
                                  (1, 3, 3, 3, 4, 6, 1))
ATTENTIVENAS_SUBNETS = dict(sorted(ATTENTIVENAS_SUBNETS.items()))

FAMILIES = {"alphanet": ALPHANET_SUBNETS, "attentivenas": ATTENTIVENAS_SUBNETS}


def named_subnet(name: str, family: str = "alphanet",
                 space: SearchSpace | None = None) -> SubnetConfig:
  """A published subnet (`a0`..`a6`, `a5_base`/`a5_1`), or `min`/`max` of `space`."""
  if name in ("min", "max"):
    space = space or alphanet_space()
    return space.min_subnet() if name == "min" else space.max_subnet()
  if family not in FAMILIES:
    raise ValueError(f"Unknown subnet family {family!r}; choose one of {sorted(FAMILIES)}.")
  table = FAMILIES[family]
  key = ALPHANET_ALIASES.get(name, name) if family == "alphanet" else name
  if key not in table:
    raise ValueError(f"Unknown {family} subnet {name!r}; choose one of "
                     f"{sorted(table) + (sorted(ALPHANET_ALIASES) if family == 'alphanet' else [])}"
                     f" or 'min'/'max'.")
  return table[key]


def load_subnet(spec: str, space: SearchSpace, family: str = "alphanet") -> SubnetConfig:
  """A subnet from a name (`a4`, `min`), an inline JSON object or a path to a JSON file."""
  text = spec.strip()
  if text.startswith("{"):
    cfg = SubnetConfig.from_json(text)
  elif text.endswith(".json"):
    with open(text) as f:
      cfg = SubnetConfig.from_dict(json.load(f))
  else:
    cfg = named_subnet(text, family, space)
  return space.validate(cfg)
