"""The StABlE phase machine (mdsim/training/phases.py) against the rules of spec §6, with the
documented deviations from quirks 7 and 8 (spec §9)."""
import pytest
import torch

from mdsim.training.phases import (END_CYCLE, LEARNED, SIMULATED, START_LEARNING, Phase, PhaseRules,
                                   next_phase)

LR = 1e-3
RULES = PhaseRules(lr=LR, always_learn=False, max_frac_unstable=0.75, min_frac_unstable=0.25,
                   max_times_reduce_lr=2)
ALWAYS = PhaseRules(lr=LR, always_learn=True, max_frac_unstable=0.75, min_frac_unstable=0.25,
                    max_times_reduce_lr=2)
NO_OBS = PhaseRules(lr=LR, always_learn=False, max_frac_unstable=0.75, min_frac_unstable=0.0,
                    max_times_reduce_lr=2, can_learn=False)
TWO_REDUCTIONS = LR * 0.2 * 0.2  # what ReduceLROnPlateau holds after two ×0.2 steps

SIM, LEARN0 = Phase(False), Phase(True)

# (rules, phase, u, lr after the step) -> (next phase, event kind, saves, new lr, restart unstable)
TABLE = [
    # simulation phase: below the threshold replicas continue (unstable ones restart)
    (RULES, SIM, 0.5, None, SIM, SIMULATED, (), None, True),
    (RULES, Phase(False, 2), 0.74, None, Phase(False, 2), SIMULATED, (), None, True),
    # reaching max_frac_unstable_threshold (inclusive) starts a cycle at lr; no update this epoch
    (RULES, SIM, 0.75, None, Phase(True, 0, 0), START_LEARNING, (), LR, False),
    (RULES, Phase(False, 2), 1.0, None, Phase(True, 2, 0), START_LEARNING, (), LR, False),
    # obs_loss_weight 0: never learns
    (NO_OBS, SIM, 1.0, None, SIM, SIMULATED, (), None, True),
    # learning epochs save cycle<c+1>_epoch<k>, k from 1; the cycle restarts from its start states
    (RULES, LEARN0, 0.5, LR, Phase(True, 0, 1), LEARNED, ("cycle1_epoch1",), None, False),
    (RULES, Phase(True, 1, 4), 0.5, LR * 0.2, Phase(True, 1, 5), LEARNED, ("cycle2_epoch5",), None, False),
    # cycle end by lr: two reductions reach lr/5^2 (quirk 7 not reproduced: the original needs three)
    (RULES, Phase(True, 1, 4), 0.5, TWO_REDUCTIONS, Phase(False, 2, 0), END_CYCLE,
     ("cycle2_epoch5", "end_of_cycle2"), 0.0, True),
    # cycle end by the unstable fraction (inclusive)
    (RULES, Phase(True, 0, 2), 0.25, LR, Phase(False, 1, 0), END_CYCLE, ("cycle1_epoch3", "end_of_cycle1"), 0.0,
     True),
    (RULES, Phase(True, 0, 2), 0.26, LR, Phase(True, 0, 3), LEARNED, ("cycle1_epoch3",), None, False),
    # always learning (only_learn_if_unstable_threshold_reached false): no cycle end; replicas continue
    (ALWAYS, LEARN0, 0.0, TWO_REDUCTIONS / 10, Phase(True, 0, 1), LEARNED, ("cycle1_epoch1",), None, True),
    (ALWAYS, Phase(True, 0, 7), 1.0, LR, Phase(True, 0, 8), LEARNED, ("cycle1_epoch8",), None, True),
]


@pytest.mark.parametrize("rules,phase,u,lr,nxt,kind,saves,new_lr,restart", TABLE)
def test_transition_table(rules, phase, u, lr, nxt, kind, saves, new_lr, restart):
    got, event = next_phase(phase, rules, u, lr)
    assert got == nxt
    assert (event.kind, event.save, event.new_lr, event.restart_unstable) == (kind, saves, new_lr, restart)


def test_initial_phase_and_lr():
    assert RULES.initial() == (Phase(False), 0.0)  # lr 0 until the threshold is reached
    assert ALWAYS.initial() == (Phase(True), LR)
    assert not RULES.restarts_from_cycle_start(SIM) and RULES.restarts_from_cycle_start(LEARN0)
    assert not ALWAYS.restarts_from_cycle_start(LEARN0)
    assert not NO_OBS.learns(LEARN0) and RULES.learns(LEARN0)


def test_from_config():
    from mdsim.config import load_config, StableConfig
    cfg = load_config(StableConfig, None, ["lr=0.01", "max_times_reduce_lr=3", "obs_loss_weight=0",
                                           "only_learn_if_unstable_threshold_reached=false"])
    r = PhaseRules.from_config(cfg)
    assert r.always_learn and not r.can_learn and r.min_lr == pytest.approx(0.01 / 125)


@pytest.mark.parametrize("times", [0, 1, 2, 3])
def test_cycle_ends_after_max_times_reduce_lr_real_scheduler(times):
    """Driven by torch's ReduceLROnPlateau (×0.2, patience 10) at a constant unstable fraction:
    the cycle ends at the epoch of the `max_times_reduce_lr`-th reduction (quirk 7: the original's
    strict lr < lr/5^m needs one reduction more)."""
    rules = PhaseRules(lr=LR, always_learn=False, max_frac_unstable=0.5, min_frac_unstable=0.0,
                       max_times_reduce_lr=times)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=0.2, patience=10)
    phase, reductions, epochs = LEARN0, 0, 0
    while phase.learning:
        before = opt.param_groups[0]["lr"]
        sched.step(1.0)
        lr = opt.param_groups[0]["lr"]
        reductions += lr < before
        phase, event = next_phase(phase, rules, 1.0, lr)
        epochs += 1
        assert epochs < 100
    assert reductions == times and event.kind == END_CYCLE
    assert epochs == (1 if times == 0 else 1 + 11 * times)  # first reduction after 11 bad epochs


def test_cycle_file_names_over_several_cycles():
    """Quirk 8 not reproduced: every cycle's files start at epoch 1 and the epoch that ends a
    cycle belongs to that cycle."""
    rules = PhaseRules(lr=LR, always_learn=False, max_frac_unstable=0.75, min_frac_unstable=0.0,
                       max_times_reduce_lr=0)
    phase, saves = SIM, []
    for epoch in range(6):  # always unstable: trigger, learn (ends at once: lr ≤ lr/5^0), ...
        phase, event = next_phase(phase, rules, 1.0, LR if phase.learning else None)
        saves += event.save
    assert saves == ["cycle1_epoch1", "end_of_cycle1", "cycle2_epoch1", "end_of_cycle2",
                     "cycle3_epoch1", "end_of_cycle3"]
    assert phase == Phase(False, 3, 0)
