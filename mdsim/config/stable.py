"""Schema of StABlE training / simulation configs (``configs/stable_training/**``).

Keys and defaults follow the original's YAML files (spec §8.1); additions are marked "(new)".
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import List, Optional

from mdsim.md.integrators import DOF_CONVENTIONS, INTEGRATOR_NAMES as INTEGRATORS  # noqa: F401  (registries)
from mdsim.md.rollout import BACKENDS
from mdsim.md.stability import CRITERIA as STABILITY_CRITERIA

from .core import ConfigError, option

CRITERIA = tuple(STABILITY_CRITERIA)  # the registry in mdsim.md.stability
OBSERVABLES = ("rdf", "imd", "bond_length_dev", "adf", "vacf")
#: eval_model values (spec §7); groups: cycle and epoch of post_cycle<c>[_epoch<e>]
EVAL_MODEL_RE = re.compile(r"pre|post|\d+k|\d+percent|lmax=\d+|post_cycle(\d+)(?:_epoch(\d+))?")
#: integrator_config keys that are aliases of top-level keys (the original's layout)
INTEGRATOR_ALIASES = ("timestep", "temperature")


def check_eval_model(value: str, key: str = "eval_model") -> None:
    if not EVAL_MODEL_RE.fullmatch(value):
        raise ConfigError(f"{key}: {value!r} is not one of pre, post, <N>k, <N>percent, "
                          "lmax=<l>, post_cycle<c>, post_cycle<c>_epoch<e>")


@dataclass
class IntegratorConfig:
    ttime: float = option(20.0, "Nosé–Hoover thermostat time in units of the timestep "
                          "(Q = 3N kT (ttime·dt)²); used by NoseHoover.", gt=0.0)
    gamma: float = option(0.1, "Langevin friction in ps⁻¹; used by Langevin and LangevinOriginal.", min=0.0)
    timestep: Optional[float] = option(None, "Alias of the top-level `timestep` (fs): sets it when "
                                       "`timestep` is not given; both given must agree.", compat=True, gt=0.0)
    temperature: Optional[float] = option(None, "Alias of the top-level `temperature` (K): sets it when "
                                          "`temperature` is not given; both given must agree.", compat=True,
                                          gt=0.0)


@dataclass
class StableConfig:
    # ---- data / system
    src: str = option("data", "Data root written by download_stable_paper_data.py (original: DATAPATH).")
    name: str = option("md17", "Dataset family: md17, md22, water or xtb (folder under `src`).")
    molecule: Optional[str] = option("aspirin", "Molecule (null for water, which has no molecule level).")
    size: str = option("1k", "Size tag of the pretraining split (1k, 10k, 25percent, ...).")
    max_size: Optional[str] = option(None, "(new) Size tag whose splits give the reference observables "
                                     "(original: 10k for md17/water, 100percent for md22). null = `size`.")
    # ---- model
    model: str = option("schnet", "Model name (schnet, nequip, dimenet_pp, gemnet_t).")
    l_max: int = option(1, "NequIP folder tag (lmax=<l>) of the pretrained model.", min=0)
    checkpoint_epoch: int = option(-1, "-1 = the best pretrained checkpoint.")
    model_dir: str = option("qm_pretrained_checkpoints", "Root of the pretrained checkpoints.")
    pretrained_checkpoint: Optional[str] = option(
        None, "(new) Explicit path of the pretrained checkpoint; overrides the model_dir lookup.")
    # ---- outputs
    log_dir: str = option("./", "Output root.")
    results_dir: str = option("stable_training_results", "Subfolder of log_dir for runs.")
    exp_name: str = option("final", "Run tag used in the run folder name.")
    seed: int = option(123, "Random seed (used, unlike the original).")
    # ---- observables
    dr: float = option(0.02, "RDF bin width (Å).", min=1e-6)
    max_rdf_dist: float = option(10.0, "RDF range (Å).", gt=0.0)
    gaussian_width: float = option(0.01, "Gaussian smearing σ of the differentiable RDF (Å).", gt=0.0)
    angle_range: List[float] = option(default_factory=lambda: [0.0, 180.0], doc="ADF range (degrees).")
    vacf_window: int = option(100, "VACF lags (samples).", min=2)
    n_dump_vacf: int = option(2, "Stride between VACF windows during training.", min=1)
    # ---- MD
    integrator: str = option("NoseHoover", "MD integrator (Langevin = BAOAB; LangevinOriginal = the "
                            "original's Euler-type scheme, kept for comparison).", choices=INTEGRATORS)
    integrator_config: IntegratorConfig = option(default_factory=IntegratorConfig,
                                                 doc="Integrator parameters.")
    dof_convention: str = option("physical", "(new) Degrees of freedom g of the kinetic temperature, the "
                                 "initial velocity rescaling ((g/2)kT) and the Nosé–Hoover target: physical = "
                                 "3N−3 when the zeroed net momentum is conserved (NoseHoover, VelocityVerlet), "
                                 "3N under Langevin; original = 3N always, as the original (its NoseHoover then "
                                 "samples 3N/(3N−3)·T).", choices=DOF_CONVENTIONS)
    timestep: float = option(0.5, "MD timestep (fs).", gt=0.0)
    temperature: float = option(500.0, "Simulation temperature (K).", gt=0.0)
    data_temperature: Optional[float] = option(
        None, "(new) Temperature of the reference data (K) for RDF reweighting; null = the value "
        "stored in the data (500 K if absent, as the original).", gt=0.0)
    steps: int = option(2000, "MD steps per epoch.", min=1)
    eq_steps: int = option(0, "Steps skipped at the start of each epoch before recording.", min=0)
    n_dump: int = option(100, "Frame stride (steps) for stored frames, stability checks and dumps.", min=1)
    n_replicas: int = option(128, "Number of parallel replicas.", min=1)
    ic_stddev: float = option(0.0, "Gaussian noise added to initial positions (Å).", min=0.0)
    init_frame_offset: int = option(0, "(new) Evaluation: replicas start from test frames init_frame_offset … "
                                    "init_frame_offset + n_replicas − 1 (a pilot run on other starts than "
                                    "the evaluation's).", min=0)
    # ---- mode
    train: bool = option(True, "True = StABlE training, False = evaluation (simulate.yml).")
    eval_model: str = option("pre", "Checkpoint to evaluate: pre, <size> (10k, 50k...), lmax=<l>, post, "
                             "post_cycle<c>, post_cycle<c>_epoch<e>. `stable_training.py --eval_model X` "
                             "evaluates X even with a training config (it implies train: false).")
    # ---- stability
    stability_criterion: str = option("bond_length_deviation", "Stability check.", choices=CRITERIA)
    bond_dev_tol: float = option(0.25, "Max bond-length deviation tolerated (Å).", min=0.0)
    imd_tol: float = option(1.2, "Min intermolecular distance tolerated (Å); RDF-MAE bound for `rdf`.",
                            min=0.0)
    park_unstable: bool = option(True, "(new) Evaluation (train: false) only: at the end of every epoch, "
                                 "replicas already flagged unstable restart from their start frame and "
                                 "velocities (an exploded molecule forces a neighbour-list rebuild and a redone "
                                 "step every step: up to 2x per step), and once at most half of the replicas "
                                 "a process simulates are stable, it simulates only those (the batch shrinks, "
                                 "at most log2(n_replicas) times; each replica keeps the noise it gets in the "
                                 "full batch). Stability times and observables are final once a replica is "
                                 "flagged, so the metrics are those of simulating everything on, up to the "
                                 "float rounding a smaller batch changes; full_traj.npy has NaN where a "
                                 "replica was no longer simulated. false = simulate them on, as the original.")
    max_frac_unstable_threshold: float = option(0.75, "Unstable fraction that starts learning "
                                                "(training) or ends the run (evaluation).", min=0.0, max=1.0)
    min_frac_unstable_threshold: float = option(0.0, "Unstable fraction at or below which a learning "
                                                "cycle ends.", min=0.0, max=1.0)
    # ---- learning
    training_observable: str = option("rdf", "Observable matched by the Boltzmann estimator.",
                                      choices=OBSERVABLES)
    n_local_neighborhoods: int = option(64, "Water: neighbourhoods per frame (localized estimator).", min=1)
    n_closest_molecules: int = option(0, "Water: molecules around each neighbourhood centre.", min=0)
    local_estimator: bool = option(False, "(new) Localized Boltzmann estimator (the original's water "
                                   "variant): samples are (frame, neighbourhood) pairs with per-neighbourhood "
                                   "energies (sums of per-atom energies) and the centre molecule's bond "
                                   "lengths as observable; needs molecule_index in the data and "
                                   "training_observable: bond_length_dev. Single process only.")
    obs_loss_weight: float = option(1.0, "Observable loss weight; 0 disables all parameter updates. "
                                    "Scales the observable gradient (the original only scaled the "
                                    "logged loss; see `original_obs_weighting`).")
    energy_force_loss_weight: float = option(10.0, "Weight w of the QM energy/force gradient.", min=0.0)
    only_learn_if_unstable_threshold_reached: bool = option(True, "Learn only once the unstable "
                                                            "fraction reaches max_frac_unstable_threshold.")
    only_train_on_unstable_replicas: bool = option(False, "Estimator samples only from unstable replicas.")
    minibatch_size: int = option(40, "Estimator / energy-force minibatch size.", min=1)
    energy_force_frames_per_epoch: Optional[int] = option(
        None, "(new) Training frames of the energy/force gradient per learning epoch: a fresh random "
        "subset of this many frames (without replacement, from its own generator seeded by `seed`; "
        "unbiased estimate of the full gradient), in minibatches of `minibatch_size`. null = all "
        "training frames, as the original; a value ≥ the number of training frames also uses all.", min=1)
    gradient_clipping: bool = option(True, "Clip the total gradient norm.")
    grad_clip_norm_threshold: float = option(1.0, "Gradient-norm clip.", min=0.0)
    shuffle: bool = option(True, "Shuffle estimator samples.")
    optimizer: str = option("SGD", "Outer optimizer.", choices=("SGD", "Adam"))
    lr: float = option(0.001, "Learning rate while learning.", min=0.0)
    max_times_reduce_lr: int = option(2, "LR reductions (×0.2) before a cycle ends.", min=0)
    reset_probability: float = option(0.05, "Fraction of stable replicas randomly reset each "
                                      "simulation epoch.", min=0.0, max=1.0)
    n_epochs: int = option(500, "Epochs.", min=1)
    boltzmann_scale_by_kT: bool = option(True, "(new) Include the 1/kT factor of the Boltzmann "
                                         "estimator (the original drops it: set false to compare).")
    original_obs_weighting: bool = option(False, "(new) Reproduce the original: obs_loss_weight scales "
                                          "only the logged loss, not the gradient.")
    # ---- performance / device
    device: str = option("auto", "(new) cpu, cuda, cuda:N or auto.")
    md_backend: str = option("auto", "(new) How MD steps run: eager, compile (torch.compile), cuda_graph (CUDA "
                             "graphs), or auto: cuda_graph on CUDA; on a CPU compile when steps × n_epochs × "
                             "replicas × atoms ≥ 2e7 (compiling pays; compiled CPU steps run on one thread, "
                             "faster than several), else eager; periodic systems eager; the choice is logged "
                             "once.",
                             choices=BACKENDS)
    neighbor_skin: Optional[float] = option(0.3, "(new) Verlet neighbour-list skin (Å) of the MD force field for "
                                            "models that support it (SchNet): pairs within cutoff + skin, "
                                            "rebuilt when an atom has moved more than skin/2; forces equal the "
                                            "all-pairs ones. null: the static all-pairs graph.", min=0.0)
    radial_table_spacing: Optional[float] = option(0.005, "(new) MD only: models that support it (SchNet) read their "
                                                   "radial functions of the pair distance (the continuous filters) "
                                                   "from a cubic Hermite table with this grid spacing (Å), rebuilt "
                                                   "from the current parameters whenever they change; forces equal "
                                                   "the network's to float32 rounding, at ~2x less cost per step. "
                                                   "Training and the estimator always use the network. null: "
                                                   "evaluate the network every step.", min=1e-4, max=0.5)
    dtype: str = option("float32", "(new) Simulation dtype.", choices=("float32", "float64"))
    progress: bool = option(True, "(new) tqdm progress bars.")
    pipeline: Optional["PipelineConfig"] = option(None, "(new) One-command pipeline settings (see below); "
                                                  "null = plain training/evaluation.")
    # ---- accepted for compatibility, no effect
    diameter_viz: float = option(0.08, "GSD visualisation diameter (no effect).", compat=True)
    normalize_labels: bool = option(False, "Unused by the original (no effect).", compat=True)
    rdf_peak: float = option(1.0, "Unused (no effect).", compat=True)
    dv: float = option(0.1, "Unused (no effect).", compat=True)
    diffusion_window: int = option(1000, "Unused (no effect).", compat=True)
    adjoint: bool = option(False, "Unused (no effect).", compat=True)
    use_mse_gradient: bool = option(True, "Legacy key (no effect).", compat=True)
    rdf_loss_weight: float = option(1.0, "Legacy key (no effect).", compat=True)
    adf_loss_weight: float = option(0.0, "Legacy key (no effect).", compat=True)
    vacf_loss_weight: float = option(0.0, "Legacy key (no effect).", compat=True)
    diffusion_loss_weight: float = option(0.0, "Legacy key (no effect).", compat=True)
    allow_off_policy_updates: bool = option(False, "Legacy key (no effect).", compat=True)

    @staticmethod
    def normalize(data: dict) -> dict:
        """``integrator_config.timestep``/``.temperature`` (the original's layout) set the top-level
        keys when those are absent; when both are given they must agree."""
        ic = data.get("integrator_config")
        if not isinstance(ic, dict) or not any(ic.get(k) is not None for k in INTEGRATOR_ALIASES):
            return data
        data = dict(data)
        for k in INTEGRATOR_ALIASES:
            alias = ic.get(k)
            if alias is None:
                continue
            if k in data and data[k] != alias and not _same_number(data[k], alias):
                raise ConfigError(f"integrator_config.{k} ({alias!r}) disagrees with {k} ({data[k]!r}); "
                                  f"set only {k}")
            data.setdefault(k, alias)
        return data

    def validate(self, where=""):
        if self.angle_range and (len(self.angle_range) != 2 or self.angle_range[0] >= self.angle_range[1]):
            raise ConfigError(f"angle_range: expected [low, high] with low < high, got {self.angle_range}")
        if self.min_frac_unstable_threshold > self.max_frac_unstable_threshold:
            raise ConfigError("min_frac_unstable_threshold must not exceed max_frac_unstable_threshold")
        if self.eq_steps >= self.steps:
            raise ConfigError(f"eq_steps ({self.eq_steps}) must be smaller than steps ({self.steps})")
        if self.local_estimator and self.training_observable != "bond_length_dev":
            raise ConfigError("local_estimator: true needs training_observable: bond_length_dev "
                              f"(got {self.training_observable!r})")
        check_eval_model(self.eval_model)


def _same_number(a, b) -> bool:
    try:
        return float(a) == float(b)
    except (TypeError, ValueError):
        return False


@dataclass
class PipelineConfig:
    """(new) One-command pipeline (used by configs/quickstart): make data and a pretrained model
    if they are missing, run StABlE training, then evaluate the listed models."""
    xtb_frames: int = option(4000, "Frames of GFN2-xTB MD generated when the data are missing "
                             "(0 = never generate).", min=0)
    xtb_temperature: float = option(500.0, "Temperature of the generated data (K).", gt=0.0)
    pretrain_config: str = option("configs/pretraining/xtb/schnet.yml", "Pretraining config used when "
                                  "the pretrained checkpoint is missing.")
    pretrain_overrides: List[str] = option(default_factory=list, doc="`key=value` overrides for pretraining.")
    evaluate: List[str] = option(default_factory=lambda: ["pre", "post"], doc="eval_model values to evaluate "
                                 "after training, in order; [] = train only (no evaluation, no table).")
    simulate_overrides: List[str] = option(default_factory=list, doc="`key=value` overrides applied to "
                                           "the evaluation runs (on top of this config with train: false).")

    def validate(self, where=""):
        for i, em in enumerate(self.evaluate):
            check_eval_model(em, f"{where}.evaluate[{i}]" if where else f"evaluate[{i}]")
