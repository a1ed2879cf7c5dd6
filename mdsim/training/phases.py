"""The StABlE phase machine (spec §6), as a pure function of the epoch's outcome.

A run alternates between a *simulation phase* (replicas continue; unstable ones restart) and
*learning phases* (cycles: every epoch restarts all replicas from the states that triggered
the cycle, simulates with the current parameters and takes one optimizer step).  After each
epoch :func:`next_phase` maps (phase, unstable fraction u, learning rate after the step) to the
next phase and an :class:`Event` saying what the training loop does with the replicas, the
optimizer and the checkpoints.  Rules (config keys in ``code``):

* Start: learning iff not ``only_learn_if_unstable_threshold_reached`` ("always learn"); the
  optimizer starts at ``lr`` when learning, else at 0 (spec §6.1).
* Simulation phase → learning: u ≥ ``max_frac_unstable_threshold`` (u counts the replicas that
  went unstable since the last learning phase) and ``obs_loss_weight`` ≠ 0.  The triggering
  epoch makes no update; the cycle's epochs restart from that epoch's start states; a fresh
  optimizer and ReduceLROnPlateau scheduler start at ``lr`` (spec §6.2).
* A learning epoch saves ``cycle<c+1>_epoch<k>`` (k from 1).  The cycle ends (not when always
  learning) when the scheduler has lowered the learning rate to lr/5^``max_times_reduce_lr`` or
  u ≤ ``min_frac_unstable_threshold``; then ``end_of_cycle<c+1>`` is saved, the optimizer is
  recreated at lr 0 and the unstable count is cleared (spec §6.3).
* With ``obs_loss_weight`` = 0 nothing is ever learned: every epoch is a simulation epoch.

Where this follows the original and where not (spec §9):

* Quirk 7 (not reproduced): the original ends a cycle when lr < lr/5^m *strictly*; two ×0.2
  reductions give equality in exact arithmetic (and float rounding decides), so it needs three.
  Here lr ≤ lr/5^m (with a 1e-9 relative tolerance): ``max_times_reduce_lr`` reductions end it.
* Quirk 8 (not reproduced): the original also saves the epoch that ends a cycle as
  ``cycle<c+1>_epoch1`` of the *next* cycle, whose own files then start at epoch 2.  Here that
  epoch is ``cycle<c>_epoch<k>`` (plus ``end_of_cycle<c>``) and every cycle starts at epoch 1.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Tuple

#: relative tolerance of the lr ≤ min_lr test (quirk 7)
LR_TOLERANCE = 1e-9

#: events returned by :func:`next_phase`
SIMULATED = "simulated"  # simulation epoch: restart unstable replicas, random resets, keep start
START_LEARNING = "start_learning"  # threshold reached: next epochs learn from this epoch's starts
LEARNED = "learned"  # a learning epoch that continues the cycle
END_CYCLE = "end_cycle"  # the learning epoch that ends the cycle


@dataclass(frozen=True)
class Phase:
    """Where the run is: learning or not, completed cycles, learning epochs in this cycle."""
    learning: bool
    cycle: int = 0
    learn_epoch: int = 0


@dataclass(frozen=True)
class PhaseRules:
    """The config keys that drive the phase machine."""
    lr: float
    always_learn: bool  # not only_learn_if_unstable_threshold_reached
    max_frac_unstable: float
    min_frac_unstable: float
    max_times_reduce_lr: int
    can_learn: bool = True  # obs_loss_weight != 0

    @classmethod
    def from_config(cls, cfg) -> "PhaseRules":
        return cls(lr=cfg.lr, always_learn=not cfg.only_learn_if_unstable_threshold_reached,
                   max_frac_unstable=cfg.max_frac_unstable_threshold,
                   min_frac_unstable=cfg.min_frac_unstable_threshold,
                   max_times_reduce_lr=cfg.max_times_reduce_lr, can_learn=cfg.obs_loss_weight != 0)

    @property
    def min_lr(self) -> float:
        return self.lr / (5 ** self.max_times_reduce_lr)

    def initial(self) -> Tuple[Phase, float]:
        """(first phase, initial learning rate)."""
        return Phase(learning=self.always_learn), (self.lr if self.always_learn else 0.0)

    def learns(self, phase: Phase) -> bool:
        """Whether an epoch in ``phase`` takes an optimizer step."""
        return phase.learning and self.can_learn

    def restarts_from_cycle_start(self, phase: Phase) -> bool:
        """Whether an epoch in ``phase`` starts from the states that triggered the cycle."""
        return phase.learning and not self.always_learn


@dataclass(frozen=True)
class Event:
    """What the loop does after an epoch.  ``restart_unstable``: the next epoch continues from
    this one's end, unstable replicas restarting from this epoch's start states (fresh
    velocities); otherwise the next epoch starts from the cycle's start states.  A ``SIMULATED``
    epoch also resets random stable replicas to earlier start states and keeps its own."""
    kind: str
    save: Tuple[str, ...] = field(default=())  # checkpoint names (without .pt), in order
    new_lr: Optional[float] = None  # a fresh optimizer/scheduler at this lr, or None
    restart_unstable: bool = False


def next_phase(phase: Phase, rules: PhaseRules, u: float, lr: Optional[float] = None) -> Tuple[Phase, Event]:
    """The phase after an epoch with unstable fraction ``u``; ``lr``: the learning rate after
    this epoch's optimizer step and scheduler step (learning epochs only)."""
    if rules.learns(phase):
        k = phase.learn_epoch + 1
        saved = (f"cycle{phase.cycle + 1}_epoch{k}",)
        if not rules.always_learn and (lr <= rules.min_lr * (1 + LR_TOLERANCE) or u <= rules.min_frac_unstable):
            return (Phase(False, phase.cycle + 1, 0),
                    Event(END_CYCLE, saved + (f"end_of_cycle{phase.cycle + 1}",), new_lr=0.0,
                          restart_unstable=True))
        # always learning: replicas continue (unstable ones restart); else the cycle restarts
        return Phase(True, phase.cycle, k), Event(LEARNED, saved, restart_unstable=rules.always_learn)
    if not phase.learning and rules.can_learn and u >= rules.max_frac_unstable:
        return Phase(True, phase.cycle, 0), Event(START_LEARNING, new_lr=rules.lr)
    return phase, Event(SIMULATED, restart_unstable=True)
