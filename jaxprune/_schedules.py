"""Sparsity schedules for training-time pruning: when to recompute masks and to which target.

Each schedule is a frozen, hashable dataclass; ``schedule(step)`` returns
``(target_sparsity, update_now)`` as traced scalars, so it runs inside ``jit``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxprune._validate import check_int, check_sparsity


_MAX_STEP = 2**31 - 1  # steps are counted in int32 (optax's counter)


def _check_step(name: str, value: int, minimum: int = 0) -> None:
  check_int(name, value, minimum, _MAX_STEP)


@dataclasses.dataclass(frozen=True, kw_only=True)
class OneShot:
  """Prune once, at ``step``, straight to ``sparsity``; masks stay fixed afterwards."""

  sparsity: float
  step: int = 0

  def __post_init__(self):
    check_sparsity(self.sparsity)
    _check_step("step", self.step)

  def __call__(self, step: jax.Array) -> tuple[jax.Array, jax.Array]:
    return jnp.float32(self.sparsity), step == self.step


@dataclasses.dataclass(frozen=True, kw_only=True)
class Iterative:
  """Prune/fine-tune cycles (Han et al. 2015): ``cycles`` prunings, ``period`` steps apart.

  Cycle ``i`` (0-based, at step ``start + i * period``) prunes to
  ``1 - (1 - sparsity) ** ((i + 1) / cycles)``: each cycle removes the same fraction of
  the weights still alive, and the last reaches ``sparsity``.
  """

  sparsity: float
  cycles: int
  period: int
  start: int = 0

  def __post_init__(self):
    check_sparsity(self.sparsity)
    _check_step("cycles", self.cycles, 1)
    _check_step("period", self.period, 1)
    _check_step("start", self.start)

  def __call__(self, step: jax.Array) -> tuple[jax.Array, jax.Array]:
    rel = step - self.start
    cycle = rel // self.period
    now = (rel >= 0) & (rel % self.period == 0) & (cycle < self.cycles)
    frac = (jnp.clip(cycle, 0, self.cycles - 1) + 1).astype(jnp.float32) / self.cycles
    return 1.0 - jnp.float32(1.0 - self.sparsity) ** frac, now


@dataclasses.dataclass(frozen=True, kw_only=True)
class Polynomial:
  """Gradual pruning (Zhu & Gupta 2017): ``s_t = s_f + (s_i - s_f) (1 - (t - t0) / T) ** power``.

  With the defaults ``s_i = 0`` and ``power = 3`` this is ``s_f (1 - (1 - t/T)^3)`` for
  ``t = step - begin_step`` in ``[0, T]``, ``T = end_step - begin_step``. Masks are
  recomputed every ``frequency`` steps in that interval (and at ``end_step``).
  """

  sparsity: float
  begin_step: int
  end_step: int
  frequency: int = 1
  initial_sparsity: float = 0.0
  power: int = 3

  def __post_init__(self):
    check_sparsity(self.sparsity)
    check_sparsity(self.initial_sparsity, "initial_sparsity")
    _check_step("begin_step", self.begin_step)
    _check_step("end_step", self.end_step)
    _check_step("frequency", self.frequency, 1)
    _check_step("power", self.power, 1)
    if self.end_step <= self.begin_step:
      raise ValueError(f"end_step must be > begin_step, got {self.end_step} <= {self.begin_step}")
    if self.initial_sparsity > self.sparsity:
      raise ValueError(f"initial_sparsity must be <= sparsity (sparsity only grows: pruned weights stay pruned), "
                       f"got {self.initial_sparsity} > {self.sparsity}")

  def __call__(self, step: jax.Array) -> tuple[jax.Array, jax.Array]:
    span = self.end_step - self.begin_step
    t = jnp.clip(step - self.begin_step, 0, span).astype(jnp.float32)
    s = self.sparsity + (self.initial_sparsity - self.sparsity) * (1.0 - t / span) ** self.power
    rel = step - self.begin_step
    now = (rel >= 0) & (step <= self.end_step) & ((rel % self.frequency == 0) | (step == self.end_step))
    return jnp.float32(s), now


@dataclasses.dataclass(frozen=True, kw_only=True)
class Fixed:
  """Never recomputes masks: the transformation only keeps pruned weights at zero."""

  def __call__(self, step: jax.Array) -> tuple[jax.Array, jax.Array]:
    del step
    return jnp.float32(0.0), jnp.zeros((), bool)


Schedule = OneShot | Iterative | Polynomial | Fixed
