"""Orbax checkpoints of an NNX model and its optimizer, for exact resume.

A checkpoint ``<directory>/<step>/`` (managed by ``ocp.CheckpointManager``:
atomic, so a run killed mid-save leaves only complete checkpoints; the last
``keep`` are kept) holds the items

* ``model``: the whole ``nnx.state(model)`` (parameters and every other
  variable, including the key and count of any ``nnx.Rngs`` stream),
* ``optimizer``: ``nnx.state(optimizer)`` (its step counter and the optax
  state: Adam moments, schedule count),
* ``rng``: an optional extra PRNG key of the caller's,
* ``meta``: JSON, ``{"step": ..., **metadata}`` (``fit`` stores its data seed).

States are stored as pure nested dicts (``nnx.to_pure_dict``) with typed PRNG
keys as their uint32 key data, and restored into abstract targets
(``jax.ShapeDtypeStruct``s of the live objects' ``nnx.state``), so a restore
checks shapes and dtypes and gives back exactly the saved arrays.
"""

from __future__ import annotations

import logging as std_logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from flax import nnx


class _DropOrbaxInfo(std_logging.Filter):
  """Drops orbax's INFO (and lower) records; its warnings and errors pass."""

  def filter(self, record):
    return record.levelno >= std_logging.WARNING or "orbax" not in record.pathname


_ORBAX_FILTER = _DropOrbaxInfo()


def quiet_orbax_logs(quiet: bool = True) -> None:
  """Silences (or, with False, restores) orbax's INFO log lines, several dozen
  per checkpoint, on absl's logger and handler (so ``fit``'s own lines stay
  readable). ``Checkpointer(quiet=True)`` calls it."""
  for target in (logging.get_absl_logger(), logging.get_absl_handler()):
    if quiet:
      target.addFilter(_ORBAX_FILTER)  # no-op if present
    else:
      target.removeFilter(_ORBAX_FILTER)


def _is_key(x) -> bool:
  return isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def _savable(pure):
  return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, pure)


def _abstract(pure):
  def leaf(x):
    if _is_key(x):
      x = jax.random.key_data(x)
    if isinstance(x, (jax.Array, np.ndarray, np.generic)):
      return jax.ShapeDtypeStruct(x.shape, x.dtype)
    return x
  return jax.tree.map(leaf, pure)


def _unsavable(restored, like):
  def leaf(r, l):
    if _is_key(l):
      return jax.random.wrap_key_data(r, impl=jax.random.key_impl(l))
    return r
  return jax.tree.map(leaf, restored, like)


def _flat(tree) -> dict:
  def name(entry):
    for attr in ("key", "name", "idx"):
      if hasattr(entry, attr):
        return str(getattr(entry, attr))
    return str(entry)
  leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: x is None)[0]
  return {"/".join(name(e) for e in path): leaf for path, leaf in leaves}


def _check_target(item: str, stored, target, where: str) -> None:
  """ValueError unless the stored tree (orbax metadata) and the abstract
  target have the same leaves, shapes and dtypes (checked before orbax reads
  anything, for a clear message)."""
  stored, target = _flat(getattr(stored, "tree", stored)), _flat(target)
  missing, extra = sorted(target.keys() - stored.keys()), sorted(stored.keys() - target.keys())
  if missing or extra:
    raise ValueError(f"Checkpointer.restore: the {item} state does not match {where}: "
                     f"not in the checkpoint {missing[:5]}, only in the checkpoint "
                     f"{extra[:5]}")
  for path, want in target.items():
    got = stored[path]
    if hasattr(want, "shape") and hasattr(got, "shape"):
      if tuple(got.shape) != tuple(want.shape) or jnp.dtype(got.dtype) != jnp.dtype(want.dtype):
        raise ValueError(f"Checkpointer.restore: {item} leaf {path!r} is "
                         f"{tuple(got.shape)} {jnp.dtype(got.dtype)} in {where}, but "
                         f"{tuple(want.shape)} {jnp.dtype(want.dtype)} in the target")


def _restore_into(obj, restored_pure, like_pure):
  """Writes a restored pure dict into ``obj`` (a Module or Optimizer)."""
  state = nnx.state(obj)
  nnx.replace_by_pure_dict(state, _unsavable(restored_pure, like_pure))
  nnx.update(obj, state)


class Checkpointer:
  """``ocp.CheckpointManager`` over ``directory`` keeping the last ``keep``
  checkpoints (``async_save``: orbax writes in a background thread; ``wait``
  or ``close`` joins it; ``quiet``: ``quiet_orbax_logs()``). Use as a context
  manager or call ``close()``."""

  def __init__(self, directory: str | os.PathLike, *, keep: int = 3, async_save: bool = True,
               quiet: bool = True):
    if quiet:
      quiet_orbax_logs()
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
      raise ValueError(f"Checkpointer: keep={keep!r} must be an int >= 1")
    self.directory = os.path.abspath(os.fspath(directory))
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=async_save)
    # Handlers named up front: a fresh manager can then read item metadata
    # (without them orbax 0.12 returns None for every item of an existing
    # checkpoint, with a warning).
    handlers = {name: ocp.StandardCheckpointHandler() for name in ("model", "optimizer", "rng")}
    handlers["meta"] = ocp.JsonCheckpointHandler()
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_handlers=handlers)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, model: nnx.Module, optimizer: nnx.Optimizer | None = None, *,
           rng: jax.Array | None = None, metadata: dict | None = None) -> bool:
    """Saves a checkpoint for ``step`` (an int >= 0); returns whether orbax
    saved (False if that step exists already)."""
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
      raise ValueError(f"Checkpointer.save: step={step!r} must be an int >= 0")
    step = int(step)
    meta = {"step": step, **(metadata or {})}
    items = {"model": ocp.args.StandardSave(_savable(nnx.to_pure_dict(nnx.state(model))))}
    if optimizer is not None:
      items["optimizer"] = ocp.args.StandardSave(
          _savable(nnx.to_pure_dict(nnx.state(optimizer))))
    if rng is not None:
      if not _is_key(rng):
        raise ValueError("Checkpointer.save: rng must be a typed key (jax.random.key), "
                         f"got dtype {getattr(rng, 'dtype', type(rng))}")
      items["rng"] = ocp.args.StandardSave({"key_data": jax.random.key_data(rng)})
      meta["rng_impl"] = str(jax.random.key_impl(rng))
    meta["items"] = sorted(items)
    items["meta"] = ocp.args.JsonSave(meta)
    return self.manager.save(step, args=ocp.args.Composite(**items))

  def restore(self, model: nnx.Module, optimizer: nnx.Optimizer | None = None, *,
              step: int | None = None) -> dict | None:
    """Restores checkpoint ``step`` (default: the latest) in place into
    ``model`` (and ``optimizer`` if given), which must have the saved
    structure, shapes and dtypes (build them as for a fresh run). Returns
    the metadata dict (``step``, the caller's metadata, and ``rng``: the
    restored key or None), or None if there is no checkpoint."""
    if step is None:
      step = self.latest_step()
      if step is None:
        return None
    elif step not in self.manager.all_steps():
      raise ValueError(f"Checkpointer.restore: step={step!r} is not among the saved steps "
                       f"{self.all_steps()} in {self.directory}")
    meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    meta = dict(meta["meta"])
    saved_items = set(meta.pop("items", ["model", "optimizer"]))
    if optimizer is not None and "optimizer" not in saved_items:
      raise ValueError(f"Checkpointer.restore: checkpoint {step} in {self.directory} has no "
                       "optimizer state")
    targets = {"model": nnx.to_pure_dict(nnx.state(model))}
    if optimizer is not None:
      targets["optimizer"] = nnx.to_pure_dict(nnx.state(optimizer))
    abstract = {name: _abstract(like) for name, like in targets.items()}
    stored = self.manager.item_metadata(step)
    for name, target in abstract.items():
      if stored[name] is not None:  # None: orbax could not read it; its restore checks
        _check_target(name, stored[name], target, f"checkpoint {step} in {self.directory}")
    args = {name: ocp.args.StandardRestore(target) for name, target in abstract.items()}
    if "rng" in saved_items:
      args["rng"] = ocp.args.StandardRestore()
    restored = self.manager.restore(step, args=ocp.args.Composite(**args))
    for name, like in targets.items():
      _restore_into(model if name == "model" else optimizer, restored[name], like)
    rng_impl = meta.pop("rng_impl", None)
    meta["rng"] = None
    if "rng" in saved_items:
      meta["rng"] = jax.random.wrap_key_data(
          jnp.asarray(restored["rng"]["key_data"]), impl=rng_impl)
    return meta

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
