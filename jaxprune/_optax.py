"""Training-time pruning as an optax ``GradientTransformation``: masks in the state, pruned weights kept at 0."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxprune._masks import DEFAULT_INCLUDE, dense_masks
from jaxprune._schedules import Fixed, Schedule
from jaxprune._scores import magnitude_scores
from jaxprune._topk import nm_masks, topk_masks
from jaxprune._tree import map_with_path
from jaxprune._validate import check_masks, check_scope, parse_pattern

PyTree = Any


class PruningState(NamedTuple):
  """``count``: steps taken (int32); ``masks``: bool arrays (True = keep), None for dense leaves."""

  count: jax.Array
  masks: PyTree


def prune_updates(schedule: Schedule | None = None, *, score_fn: Callable[[PyTree], PyTree] | None = None,
                  scope: str = "layer", pattern: Any = None, masks: PyTree | None = None,
                  include: str = DEFAULT_INCLUDE, exclude: str | None = None) -> optax.GradientTransformation:
  """A transformation that keeps pruned weights exactly zero and updates masks on a schedule.

  Put it last in a chain so it sees the optimizer's final updates::

    tx = optax.chain(optax.adamw(1e-3), prune_updates(Polynomial(sparsity=0.5, begin_step=0, end_step=1000)))

  For a masked leaf the outgoing update is ``where(mask, u, -params)``: kept weights move
  as the optimizer says, pruned ones land on exactly ``0`` (``p + (-p) == 0``) and stay
  there. When ``schedule(count)`` says so, masks are recomputed from
  ``score_fn(params)`` at the schedule's target (entries already pruned stay pruned).

  Args:
    schedule: :class:`OneShot`, :class:`Iterative`, :class:`Polynomial` or None / :class:`Fixed`
      (masks never change: recovery fine-tuning).
    score_fn: ``params -> scores`` pytree (higher = keep); default magnitude on the selected leaves.
    scope: ``"layer"``, ``"global"`` or ``"output"`` top-k (ignored with ``pattern``).
    pattern: optional N:M pattern (``"2:4"``); mask updates then impose it instead of a target.
    masks: initial masks (default all-True on the leaves ``include`` / ``exclude`` select).
    include, exclude: leaf selection when ``masks`` is None.

  Returns:
    ``optax.GradientTransformation``; its state is a :class:`PruningState`.
  """
  schedule = schedule or Fixed()
  if not callable(schedule):
    raise ValueError(f"schedule must be a schedule (OneShot, Iterative, Polynomial, Fixed: step -> (target, now)) "
                     f"or None, got {schedule!r}")
  check_scope(scope)
  nm = parse_pattern(pattern)
  score_fn = score_fn or (lambda p: magnitude_scores(p, include=include, exclude=exclude))

  def init_fn(params):
    if masks is None:
      start = dense_masks(params, include=include, exclude=exclude)
    else:
      check_masks(params, masks)
      start = map_with_path(lambda _, m: None if m is None or m is True else jnp.asarray(m), masks)
    return PruningState(jnp.zeros((), jnp.int32), start)

  def recompute(params, old, target):
    scores = map_with_path(lambda _, m, s: None if m is None else s, old, score_fn(params))
    if nm is None:
      return topk_masks(scores, target, scope=scope, masks=old)
    new = nm_masks(scores, nm, masks=old)  # leaves that cannot hold N:M keep their masks
    return map_with_path(lambda _, o, n: o if n is None else n, old, new)

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("prune_updates needs params: call tx.update(grads, state, params)")
    if isinstance(schedule, Fixed):
      new_masks = state.masks
    else:
      target, now = schedule(state.count)
      new_masks = jax.lax.cond(now, lambda: recompute(params, state.masks, target), lambda: state.masks)
    updates = map_with_path(
        lambda _, m, u, p: u if m is None else jnp.where(m, u, (-p).astype(u.dtype)), new_masks, updates, params)
    return updates, PruningState(optax.safe_int32_increment(state.count), new_masks)

  return optax.GradientTransformation(init_fn, update_fn)


def find_pruning_state(opt_state: Any) -> PruningState:
  """The :class:`PruningState` inside an optimizer state (e.g. of an ``optax.chain``)."""
  found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, PruningState))
           if isinstance(s, PruningState)]
  if len(found) != 1:
    raise ValueError(f"expected one PruningState in the optimizer state, found {len(found)}")
  return found[0]
