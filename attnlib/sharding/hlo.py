"""Collectives read from compiled HLO text, and the bytes each chip sends.

`collectives_in_hlo` parses the text of ``jax.jit(f).lower(*args).compile()
.as_text()`` (an ``HloModule`` after SPMD partitioning) and returns one
`HloCollective` per all-gather, reduce-scatter, all-reduce, all-to-all and
collective-permute instruction:

* synchronous ops (``all-gather(...)``) count once; asynchronous pairs
  (``all-gather-start`` / ``all-gather-done``, likewise for all-reduce and
  collective-permute) count once, at the start, with the result shape taken
  from the matching done; collectives wrapped in ``async-start`` computations
  are counted where they appear inside the wrapped computation;
* tuple-shaped (combined) collectives are one op whose bytes sum the tuple;
* replica groups are expanded to explicit device-id groups from any of the
  three printed formats: explicit ``{{0,1},{2,3}}`` (``{}`` = all devices),
  iota ``[2,4]<=[8]`` / ``[2,4]<=[4,2]T(1,0)``, and the mesh-axes form that
  current XLA prints, ``mesh['x'=2,'y'=2,'z'=2] {'z'}`` (optionally with
  ``, device_ids=(...)`` and sub-axes ``'x':(1)2``).

`sent_bytes_per_chip` turns them into bytes each chip sends, per kind, under
the ring convention of `attnlib.sharding.feedforward.Collective` (n = group
size): all-gather (n-1)/n * result, reduce-scatter (n-1)/n * operand,
all-reduce 2(n-1)/n * operand, all-to-all (n-1)/n * operand; a
collective-permute sends its whole operand from every source chip.

Example::

  text = jax.jit(f).lower(x).compile().as_text()
  sent_bytes_per_chip(collectives_in_hlo(text))   # {"all-gather": 3072, ...}
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterable, Sequence

import numpy as np

KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all",
         "collective-permute")
_ASYNC = {k + "-start": k for k in ("all-gather", "all-reduce",
                                    "collective-permute")}
_DTYPE_BYTES = {
    "pred": 1, "s2": 1, "u2": 1, "s4": 1, "u4": 1, "s8": 1, "u8": 1,
    "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
    "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
}


@dataclasses.dataclass(frozen=True)
class HloCollective:
  """One collective instruction of a compiled module.

  kind: one of KINDS (async "-start" suffix removed).
  replica_groups: explicit groups of device (partition) ids; for a
    collective-permute, the sources and targets of its pairs as one group.
  operand_bytes / result_bytes: per-chip bytes of the operand(s) and result
    (summed over tuple elements).
  name: the instruction name; source_target_pairs: collective-permute only.
  """

  kind: str
  replica_groups: tuple[tuple[int, ...], ...]
  operand_bytes: int
  result_bytes: int
  name: str = ""
  source_target_pairs: tuple[tuple[int, int], ...] = ()

  @property
  def group_size(self) -> int:
    """Devices per replica group (all groups have one size in SPMD code)."""
    return max((len(g) for g in self.replica_groups), default=1)

  @property
  def sent_bytes(self) -> int:
    """Bytes one chip sends for this op (ring convention; module doc)."""
    n = self.group_size
    if self.kind == "collective-permute":
      real = [p for p in self.source_target_pairs if p[0] != p[1]]
      return self.operand_bytes if real else 0
    if n <= 1:
      return 0
    if self.kind == "all-gather":
      return (n - 1) * self.result_bytes // n
    if self.kind == "all-reduce":
      return 2 * (n - 1) * self.operand_bytes // n
    return (n - 1) * self.operand_bytes // n   # reduce-scatter, all-to-all


# ----------------------------------------------------------------------------
# Shapes.

_ARRAY_RE = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,<=]*)\]")


def shape_bytes(shape: str) -> int:
  """Bytes of an HLO shape string (tuples summed; layouts ignored)."""
  total = 0
  for dtype, dims in _ARRAY_RE.findall(shape):
    if dtype == "token":
      continue
    size = _DTYPE_BYTES.get(dtype, 1 if dtype.startswith("f8") else None)
    if size is None:
      raise ValueError(f"unknown HLO element type {dtype!r} in {shape!r}")
    n = math.prod(int(d.replace("<=", "")) for d in dims.split(",") if d)
    total += n * size
  return total


def _balanced(text: str, start: int, open_: str, close: str) -> int:
  """Index just past the bracket closing the one at text[start]."""
  depth = 0
  for i in range(start, len(text)):
    c = text[i]
    if c == open_:
      depth += 1
    elif c == close:
      depth -= 1
      if depth == 0:
        return i + 1
  raise ValueError(f"unbalanced {open_}{close} in HLO: {text[start:start + 80]!r}")


_DEF_RE = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*")
_OP_RE = re.compile(r"\s*([a-z][\w\-]*)\(")


@dataclasses.dataclass
class _Inst:
  name: str
  shape: str
  op: str
  operands: list[str]
  attrs: str


def _parse_line(line: str) -> _Inst | None:
  m = _DEF_RE.match(line)
  if not m:
    return None
  pos = m.end()
  if pos < len(line) and line[pos] == "(":
    end = _balanced(line, pos, "(", ")")
  else:
    sp = line.find(" ", pos)
    if sp < 0:
      return None
    end = sp
  shape = line[pos:end]
  om = _OP_RE.match(line, end)
  if not om:
    return None
  args_start = om.end() - 1
  args_end = _balanced(line, args_start, "(", ")")
  args = line[args_start + 1:args_end - 1]
  operands = re.findall(r"%([\w.\-]+)", args)
  if not operands:   # very old printing without %: operands are bare names
    operands = [a.strip().split(" ")[-1] for a in args.split(",") if a.strip()]
  return _Inst(m.group(1), shape, om.group(1), operands, line[args_end:])


# ----------------------------------------------------------------------------
# Replica groups.


def _ints(s: str) -> list[int]:
  return [int(v) for v in re.findall(r"-?\d+", s)]


def _iota_groups(spec: str) -> tuple[tuple[int, ...], ...]:
  m = re.fullmatch(r"\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", spec)
  if not m:
    raise ValueError(f"cannot parse iota replica groups {spec!r}")
  out_shape, dims = _ints(m.group(1)), _ints(m.group(2))
  ids = np.arange(math.prod(dims)).reshape(dims)
  if m.group(3):
    ids = ids.transpose(_ints(m.group(3)))
  ids = ids.reshape(out_shape)
  return tuple(tuple(int(v) for v in row) for row in ids.reshape(ids.shape[0], -1))


_MESH_RE = re.compile(r"mesh\[([^\]]*)\](?:,\s*device_ids=\(([^)]*)\))?\s*\{([^}]*)\}")


def _mesh_groups(spec: str) -> tuple[tuple[int, ...], ...]:
  m = _MESH_RE.fullmatch(spec.strip())
  if not m:
    raise ValueError(f"cannot parse mesh replica groups {spec!r}")
  names, sizes = [], []
  for item in m.group(1).split(","):
    name, size = item.rsplit("=", 1)
    names.append(name.strip().strip("'\""))
    sizes.append(int(size))
  n_dev = math.prod(sizes)
  ids = (np.array(_ints(m.group(2))) if m.group(2) else np.arange(n_dev))
  # Axis refs: 'x' or 'x':(pre)size. Split each mesh axis into the sub-axes
  # referenced (major to minor by pre-size), then move the grouped ones last.
  refs = []
  for tok in [t.strip() for t in m.group(3).split(",") if t.strip()]:
    sm = re.fullmatch(r"'?([^':]+)'?(?::\((\d+)\)(\d+))?", tok)
    if not sm:
      raise ValueError(f"cannot parse mesh axis {tok!r} in {spec!r}")
    axis = names.index(sm.group(1))
    if sm.group(2):
      refs.append((axis, int(sm.group(2)), int(sm.group(3))))
    else:
      refs.append((axis, 1, sizes[axis]))
  dims, where = [], {}
  for a, size in enumerate(sizes):
    pieces = sorted((p, s) for ax, p, s in refs if ax == a)
    covered = 1
    for pre, sub in pieces:
      if pre != covered:
        dims.append(pre // covered)
        covered = pre
      where[(a, pre, sub)] = len(dims)
      dims.append(sub)
      covered *= sub
    if covered != size:
      dims.append(size // covered)
  grouped = [where[r] for r in refs]
  rest = [d for d in range(len(dims)) if d not in grouped]
  arr = ids.reshape(dims).transpose(rest + grouped)
  group = math.prod(dims[d] for d in grouped)
  return tuple(tuple(int(v) for v in row) for row in arr.reshape(-1, group))


def parse_replica_groups(spec: str, num_devices: int | None = None
                         ) -> tuple[tuple[int, ...], ...]:
  """Explicit groups from a printed replica_groups value (any format)."""
  spec = spec.strip()
  if spec.startswith("mesh["):
    return _mesh_groups(spec)
  if spec.startswith("["):
    return _iota_groups(spec)
  if spec.startswith("{"):
    inner = spec[1:-1].strip()
    if not inner:
      if num_devices is None:
        return ()
      return (tuple(range(num_devices)),)
    return tuple(tuple(_ints(g)) for g in re.findall(r"\{([^{}]*)\}", inner))
  raise ValueError(f"cannot parse replica groups {spec!r}")


def _attr_value(attrs: str, key: str) -> str | None:
  """The printed value of `key=` in an attribute list (balanced)."""
  m = re.search(r"\b" + re.escape(key) + r"=", attrs)
  if not m:
    return None
  pos = m.end()
  if attrs.startswith("mesh[", pos):
    mm = _MESH_RE.match(attrs, pos)
    if not mm:
      raise ValueError(f"cannot parse {key} in {attrs[pos:pos + 120]!r}")
    return mm.group(0)
  if attrs[pos] == "{":
    return attrs[pos:_balanced(attrs, pos, "{", "}")]
  if attrs[pos] == "[":
    mm = re.match(r"\[[\d,]+\]<=\[[\d,]+\](?:T\([\d,]+\))?", attrs[pos:])
    if not mm:
      raise ValueError(f"cannot parse {key} in {attrs[pos:pos + 120]!r}")
    return mm.group(0)
  end = attrs.find(",", pos)
  return attrs[pos:end if end >= 0 else None]


# ----------------------------------------------------------------------------
# The module.


def _text_of(compiled_or_text) -> str:
  if isinstance(compiled_or_text, str):
    return compiled_or_text
  if hasattr(compiled_or_text, "as_text"):
    return compiled_or_text.as_text()
  raise ValueError("expected HLO text or an object with .as_text(), got "
                   f"{type(compiled_or_text).__name__}")


def collectives_in_hlo(text: str) -> list[HloCollective]:
  """Every collective of an HLO module's text, in textual order (see module doc).

  Raises:
    ValueError: a collective whose replica groups or shapes cannot be parsed.
  """
  text = _text_of(text)
  m = re.search(r"num_partitions=(\d+)", text)
  n_part = int(m.group(1)) if m else None
  m = re.search(r"replica_count=(\d+)", text)
  n_rep = int(m.group(1)) if m else 1
  insts: list[_Inst] = []
  for line in text.splitlines():
    inst = _parse_line(line)
    if inst is not None:
      insts.append(inst)
  shapes = {i.name: i.shape for i in insts}
  done_of = {}
  for i in insts:
    if i.op.endswith("-done") and i.operands:
      done_of[i.operands[0]] = i
  out = []
  for i in insts:
    if i.op in KINDS:
      kind, result = i.op, i.shape
    elif i.op in _ASYNC:
      kind = _ASYNC[i.op]
      done = done_of.get(i.name)
      result = done.shape if done is not None else None
    else:
      continue
    op_bytes = sum(shape_bytes(shapes[o]) for o in i.operands if o in shapes)
    if len([o for o in i.operands if o in shapes]) != len(i.operands):
      op_bytes = None
    pairs: tuple[tuple[int, int], ...] = ()
    if kind == "collective-permute":
      stp = _attr_value(i.attrs, "source_target_pairs")
      flat = _ints(stp or "")
      pairs = tuple(zip(flat[0::2], flat[1::2]))
      groups = (tuple(sorted({d for p in pairs for d in p})),) if pairs else ()
    else:
      rg = _attr_value(i.attrs, "replica_groups")
      use_global = "use_global_device_ids=true" in i.attrs
      n_dev = (n_part * n_rep if use_global or n_rep == 1 else n_rep) \
          if n_part else None
      groups = parse_replica_groups(rg, n_dev) if rg is not None else (
          (tuple(range(n_dev)),) if n_dev else ())
    n = max((len(g) for g in groups), default=1)
    if result is None and i.shape.startswith("("):
      # async start without a visible done: (operand(s), result(s), ...)
      parts = _split_tuple(i.shape)
      result = parts[1] if len(parts) > 1 else parts[0]
    res_bytes = shape_bytes(result)
    if op_bytes is None:   # derive the operand from the result
      op_bytes = {"all-gather": res_bytes // max(n, 1),
                  "reduce-scatter": res_bytes * n}.get(kind, res_bytes)
    out.append(HloCollective(kind, groups, int(op_bytes), int(res_bytes),
                             name=i.name, source_target_pairs=pairs))
  return out


def _split_tuple(shape: str) -> list[str]:
  """Top-level elements of a tuple shape string."""
  inner = shape.strip()[1:-1]
  parts, depth, cur = [], 0, ""
  for c in inner:
    if c in "([{":
      depth += 1
    elif c in ")]}":
      depth -= 1
    if c == "," and depth == 0:
      parts.append(cur.strip())
      cur = ""
    else:
      cur += c
  if cur.strip():
    parts.append(cur.strip())
  return parts


def collectives_in_compiled(compiled_or_text) -> list[HloCollective]:
  """`collectives_in_hlo` of a `jax.stages.Compiled` (or its text)."""
  return collectives_in_hlo(_text_of(compiled_or_text))


def sent_bytes_per_chip(collectives: Iterable[HloCollective]) -> dict[str, int]:
  """{kind: bytes one chip sends}, summed over ops (kinds absent when none).

  Ring convention, identical to `attnlib.sharding.feedforward.Collective`
  (see the module doc). Ops whose groups have one device send nothing and
  are left out.
  """
  out: dict[str, int] = {}
  for c in collectives:
    b = c.sent_bytes
    if b:
      out[c.kind] = out.get(c.kind, 0) + b
  return out


def group_axes(replica_groups: Sequence[Sequence[int]],
               mesh_shape: dict[str, int] | Sequence[tuple[str, int]]
               ) -> tuple[str, ...]:
  """The mesh axes along which the devices of the groups differ.

  Device (partition) id k is taken to sit at ``np.unravel_index(k, shape)``
  of the mesh, which holds for a jitted program on ``mesh`` (partition k is
  ``mesh.devices.flat[k]``). Returns the axes (mesh order) whose coordinate
  varies within a group; raises ValueError unless each group is exactly the
  full product of those axes.
  """
  items = list(mesh_shape.items()) if isinstance(mesh_shape, dict) else \
      list(mesh_shape)
  names = [n for n, _ in items]
  sizes = [int(s) for _, s in items]
  varying: set[int] = set()
  for g in replica_groups:
    coords = np.array(np.unravel_index(np.array(g), sizes)).T
    for d in range(len(sizes)):
      if len(set(coords[:, d])) > 1:
        varying.add(d)
  axes = tuple(names[d] for d in sorted(varying))
  want = math.prod(sizes[d] for d in varying)
  if any(len(set(g)) != want for g in replica_groups):
    raise ValueError(f"replica groups {replica_groups} are not whole "
                     f"sub-meshes of {dict(items)}")
  return axes
