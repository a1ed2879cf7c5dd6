"""Generate docs/config.md from the schemas: ``python -m mdsim.config.docs > docs/config.md``."""
from __future__ import annotations

from .core import iter_options
from .pretrain import PretrainConfig
from .stable import StableConfig

HEADER = """# Configuration keys

Generated from the schemas in `mdsim/config/` by `python -m mdsim.config.docs > docs/config.md`
(a test checks that this file is current). Every YAML file is validated against these schemas
before any work starts: an unknown key (with the closest valid key suggested), a wrong type, a
value out of range or not among the allowed values fails with one message naming the file and
key. A file may `includes:` a parent file (path relative to the file, the working directory
or the repository root); keys in the including file win. On the command line,
`--set key.sub=value` (repeatable) overrides any key; the original's flags (`--molecule`,
`--size`, `--seed`, `--eval_model`, ...) map to the keys named in each entry point's `--help`.

Keys marked *compat* are accepted for compatibility with the original's YAML files: they have
no effect, or (`integrator_config.timestep`, `integrator_config.temperature`) are aliases of a
main key that set it when it is absent and must agree with it when both are given. "(new)"
marks keys the original did not have.
"""


def _fmt(v):
    if isinstance(v, str):
        return f"`{v}`" if v else '`""`'
    if v is None:
        return "`null`"
    return f"`{v}`"


def table(cls) -> str:
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for key, tp, default, md in iter_options(cls):
        if tp == "section":
            rows.append(f"| **{key}** | section | | {md.get('doc', '')} |")
            continue
        doc = md.get("doc", "")
        if md.get("choices"):
            doc += " One of: " + ", ".join(f"`{c}`" for c in md["choices"]) + "."
        rng = []
        if md.get("gt") is not None:
            rng.append(f"> {md['gt']}")
        if md.get("min") is not None:
            rng.append(f"≥ {md['min']}")
        if md.get("max") is not None:
            rng.append(f"≤ {md['max']}")
        if rng:
            doc += " Range: " + ", ".join(rng) + "."
        if md.get("compat"):
            doc = "*compat* " + doc
        rows.append(f"| `{key}` | {tp} | {_fmt(default)} | {doc.replace('|', '/')} |")
    return "\n".join(rows)


def render() -> str:
    parts = [HEADER,
             "## StABlE training and simulation (`stable_training.py`, `configs/stable_training/`)\n",
             table(StableConfig), "",
             "## QM pretraining (`pretraining.py`, `configs/pretraining/`)\n",
             "`model.*` keys other than `name` are the model's hyperparameters; see docs/models.md "
             "for each model's keys (unknown ones are rejected with a suggestion).\n",
             table(PretrainConfig), ""]
    return "\n".join(parts)


if __name__ == "__main__":
    print(render(), end="")
