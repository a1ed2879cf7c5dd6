"""ASE calculator around any ``mdsim`` model checkpoint (ours or the original's SchNet ones)."""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from ase.calculators.calculator import Calculator, CalculatorSetupError, all_changes

from mdsim.models import PotentialModel, energy_and_forces, load_model


class StableCalculator(Calculator):
    """Energy (eV) and forces (eV/Å) of one ``ase.Atoms`` from a model.

    ``StableCalculator(checkpoint=PATH, device="cpu")`` or ``StableCalculator(model=model)``.
    Periodic boundary conditions are used when ``atoms.pbc.any()`` (all three directions must
    then be periodic); otherwise the cell is ignored.  Positions are passed in the model's dtype.
    """

    implemented_properties = ["energy", "forces", "free_energy"]

    def __init__(self, checkpoint=None, device="cpu", model: Optional[PotentialModel] = None, **kwargs):
        super().__init__(**kwargs)
        if (checkpoint is None) == (model is None):
            raise CalculatorSetupError("StableCalculator: give exactly one of checkpoint=PATH or model=")
        self.device = torch.device(device)
        if model is None:
            model, self.checkpoint_dict = load_model(checkpoint, self.device)
        else:
            self.checkpoint_dict = None
            model = model.to(self.device)
        self.model = model.eval()
        self.checkpoint = checkpoint
        p = next(iter(self.model.parameters()), None)
        self.dtype = p.dtype if p is not None else torch.get_default_dtype()

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        atoms = self.atoms
        pbc = np.asarray(atoms.pbc, dtype=bool)
        if pbc.any() and not pbc.all():
            raise CalculatorSetupError(f"StableCalculator: partial periodicity pbc={pbc.tolist()} "
                                       "is not supported (use all True or all False)")
        n = len(atoms)
        pos = torch.as_tensor(atoms.get_positions(), dtype=self.dtype, device=self.device)
        z = torch.as_tensor(atoms.get_atomic_numbers(), dtype=torch.long, device=self.device)
        batch = torch.zeros(n, dtype=torch.long, device=self.device)
        cell = None
        if pbc.all():
            cell = torch.as_tensor(np.asarray(atoms.get_cell()), dtype=self.dtype,
                                   device=self.device).reshape(1, 3, 3)
        energy, forces = energy_and_forces(self.model, pos, z, batch, 1, cell, equal_size=True)
        e = float(energy[0])
        self.results["energy"] = e
        self.results["free_energy"] = e
        self.results["forces"] = forces.detach().cpu().numpy().astype(np.float64)
