"""The tolerance table: every number that decides PASS/FAIL lives here (one module).

Truth is the float64 reference on the same inputs. For an output in dtype X (FlashAttention rule,
FA3/FA4 form, see ../shared/reference/TESTING_ANCHORS.md §1.1)::

    err(oracle) <= k * err(baseline) + floor

* ``err`` = max-abs error vs the truth; ``baseline`` = the reference computed in dtype X on the same
  inputs (``nsa_reference(case, inputs, dtype=None)``);
* ``k`` = 2 for forward outputs, 3 for gradients;
* ``floor`` = ``floor_mult * max|(truth_X + shift - shift) - truth_X|`` computed in X (the rounding
  noise of X at the truth's magnitude; FA3 uses ``2 * max|(out_ref + 0.3 - 0.3) - out_ref|``), never
  below its worst case ``floor_mult * ulp_X(max|truth| + shift) / 2`` (small tensors can round exactly
  and give 0), ``+ floor_add``.

Reference-layer oracles in float64/float32, and every oracle in float64 (where the baseline is the
truth itself, so the FA rule would demand bit-exactness), use a tight absolute rule instead:
``err <= tight_<dtype> * max(1, max|truth|)`` (defaults 1e-10 and 1e-5; set <= 0 to fall back to the
FA rule).

Overrides (CLI ``--tol KEY=VALUE``, config ``[tolerance]``): ``KEY`` is ``PARAM``, ``ORACLE.PARAM``,
``BRANCH.PARAM``, ``ORACLE.BRANCH.PARAM`` (``*`` allowed for ORACLE or BRANCH); the most specific
one wins: oracle.branch > oracle.* > *.branch > global > default. An unknown PARAM or BRANCH is an
error here, an ORACLE that is not registered once the oracles are loaded (``check_oracles``).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Optional

import torch

from nsaconf.oracles.base import ALL_BRANCHES, GRAD_BRANCHES

DEFAULTS: dict[str, float] = {
    "k": 2.0,               # forward outputs: err <= k * baseline_err + floor
    "k_grad": 3.0,          # gradients
    "floor_mult": 2.0,      # FA3: 2 * max|(ref + 0.3 - 0.3) - ref|
    "floor_shift": 0.3,
    "floor_add": 0.0,       # extra absolute slack (FA2 uses 1e-5 / 2e-4 in some tests)
    "tight_float64": 1e-10,  # every fp64 oracle: err <= tight * max(1, max|truth|)
    "tight_float32": 1e-5,
    "nontrivial": 0.5,      # output must satisfy err < m*max|truth| and rel_rms < m (KernelBench#165)
}
DOC: dict[str, str] = {
    "k": "forward: err <= k*baseline_err + floor",
    "k_grad": "gradients: err <= k_grad*baseline_err + floor",
    "floor_mult": "floor = floor_mult*max|(truth_X+shift-shift)-truth_X| + floor_add",
    "floor_shift": "the shift of the rounding-noise floor (FA3: 0.3)",
    "floor_add": "extra absolute slack added to the floor",
    "tight_float64": "fp64 oracles (any layer): err <= tight*max(1,max|truth|)",
    "tight_float32": "reference-layer fp32 oracles: err <= tight*max(1,max|truth|)",
    "nontrivial": "zero/constant guard: err < m*max|truth| and rel_rms < m",
}

# torch.testing.assert_close defaults (rtol, atol) per dtype: used for the mismatch fraction only.
TORCH_DEFAULT_TOLS: dict[str, tuple[float, float]] = {
    "float16": (1e-3, 1e-5), "bfloat16": (1.6e-2, 1e-5), "float32": (1.3e-6, 1e-5), "float64": (1e-7, 1e-7),
}


class ToleranceError(ValueError):
    """A malformed tolerance override (one-line message)."""


@dataclass(frozen=True)
class Rule:
    """The rule applied to one cell: ``fa`` (``err <= k*baseline + floor``) or ``tight``
    (``err <= atol``); ``source`` says where the parameters came from."""

    rule: str
    k: float
    floor_mult: float
    floor_shift: float
    floor_add: float
    tight: float
    nontrivial: float
    source: str

    def floor(self, truth: torch.Tensor, dtype: torch.dtype) -> float:
        """``floor_mult * max|(t + s - s) - t|`` with ``t = truth`` rounded to ``dtype`` and the
        arithmetic in ``dtype`` (FA3), but never below its worst case over all magnitudes up to
        ``max|truth|``: ``floor_mult * ulp_X(max|truth| + s) / 2`` (a tensor of a few elements can
        round exactly and give FA3's max 0). ``+ floor_add``. Finite entries only."""
        t = truth[torch.isfinite(truth)]
        if t.numel() == 0:
            return self.floor_add
        tx = t.to(dtype)
        noise = float((((tx + self.floor_shift) - self.floor_shift).double() - tx.double()).abs().max())
        top = float(tx.double().abs().max()) + self.floor_shift
        ulp = torch.finfo(dtype).eps * 2.0 ** math.floor(math.log2(top)) if top > 0 else 0.0
        return self.floor_mult * max(noise, ulp / 2) + self.floor_add

    def bound(self, baseline_err: float, floor: float, scale: float) -> float:
        """The error bound: ``k*baseline_err + floor`` (fa) or ``tight*max(1, scale)`` (tight)."""
        if self.rule == "tight":
            return self.tight * max(1.0, scale)
        return self.k * baseline_err + floor

    def describe(self) -> str:
        if self.rule == "tight":
            return f"err <= {self.tight:g}*max(1,max|truth|)"
        return f"err <= {self.k:g}*baseline_err + floor ({self.floor_mult:g}*noise@{self.floor_shift:g}+{self.floor_add:g})"


@dataclass
class ToleranceTable:
    """Defaults plus overrides ``{(oracle|"*", branch|"*"): {param: (value, source)}}``."""

    overrides: dict[tuple[str, str], dict[str, tuple[float, str]]] = field(default_factory=dict)

    def set(self, key: str, value: Any, source: str) -> None:
        """Add one override ``KEY=value`` (see module docstring for KEY)."""
        parts = key.strip().split(".")
        param = parts[-1]
        if param not in DEFAULTS:
            raise ToleranceError(f"unknown tolerance parameter {param!r} in {key!r}; known: {', '.join(DEFAULTS)}")
        if len(parts) == 1:
            scope = ("*", "*")
        elif len(parts) == 2:
            scope = ("*", parts[0]) if parts[0] in ALL_BRANCHES else (parts[0], "*")
        elif len(parts) == 3:
            if parts[1] != "*" and parts[1] not in ALL_BRANCHES:
                raise ToleranceError(f"unknown branch {parts[1]!r} in tolerance key {key!r}; known: {', '.join(ALL_BRANCHES)}")
            scope = (parts[0], parts[1])
        else:
            raise ToleranceError(f"tolerance key {key!r} must be PARAM, ORACLE.PARAM, BRANCH.PARAM or ORACLE.BRANCH.PARAM")
        try:
            if isinstance(value, bool):
                raise TypeError
            v = float(value)
        except (TypeError, ValueError):
            raise ToleranceError(f"tolerance {key!r} needs a number, got {value!r}") from None
        if not math.isfinite(v) or v < 0:
            raise ToleranceError(f"tolerance {key!r} must be a finite number >= 0, got {value!r}")
        self.overrides.setdefault(scope, {})[param] = (v, source)

    def set_from_string(self, text: str, source: str = "cli") -> None:
        """Parse ``KEY=VALUE`` (as given to ``--tol``)."""
        if "=" not in text:
            raise ToleranceError(f"--tol expects KEY=VALUE (e.g. fla_naive.slc_o.k=3), got {text!r}")
        key, value = text.split("=", 1)
        self.set(key, value, source)

    def check_oracles(self, oracles: Iterable[str]) -> None:
        """ToleranceError naming the first override whose ORACLE part is neither ``*`` nor one of ``oracles``
        (the registered ones): such a key would match no cell."""
        known = set(oracles)
        for (oracle, branch), params in sorted(self.overrides.items()):
            if oracle != "*" and oracle not in known:
                param, (_, source) = sorted(params.items())[0]
                key = ".".join(x for x in (oracle, branch, param) if x != "*")
                raise ToleranceError(f"tolerance key {key!r} ({source}) matches no cell: {oracle!r} is neither an oracle "
                                     f"nor a branch; oracles: {', '.join(sorted(known))}; branches: {', '.join(ALL_BRANCHES)}")

    def param(self, name: str, oracle: str, branch: str) -> tuple[float, str]:
        for scope in ((oracle, branch), (oracle, "*"), ("*", branch), ("*", "*")):
            hit = self.overrides.get(scope, {}).get(name)
            if hit is not None:
                return hit[0], f"{hit[1]}:{'.'.join(s for s in scope if s != '*') or 'global'}.{name}"
        return DEFAULTS[name], "default"

    def rule_for(self, oracle: str, layer: str, branch: str, dtype: str) -> Rule:
        """The rule of cell (oracle, branch) for an output of case dtype ``dtype``."""
        vals, sources = {}, set()
        for p in DEFAULTS:
            vals[p], src = self.param(p, oracle, branch)
            if src != "default":
                sources.add(src)
        k = vals["k_grad"] if branch in GRAD_BRANCHES else vals["k"]
        # float64: the baseline *is* the truth (err 0), so k*0 + floor would demand bit-exactness;
        # every float64 oracle gets the tight rule instead. float32: reference layer only.
        tight = vals.get(f"tight_{dtype}", 0.0) if (layer == "reference" or dtype == "float64") else 0.0
        rule = "tight" if tight > 0 else "fa"
        return Rule(rule=rule, k=k, floor_mult=vals["floor_mult"], floor_shift=vals["floor_shift"],
                    floor_add=vals["floor_add"], tight=tight, nontrivial=vals["nontrivial"],
                    source=", ".join(sorted(sources)) or "default")

    def as_dict(self) -> dict[str, Any]:
        """The table as printed into run.json and the report."""
        return {"defaults": dict(DEFAULTS), "doc": dict(DOC),
                "overrides": [{"oracle": o, "branch": b, "param": p, "value": v, "source": s}
                              for (o, b), ps in sorted(self.overrides.items()) for p, (v, s) in sorted(ps.items())]}

    def describe(self) -> str:
        lines = ["tolerance table (defaults; overrides below):"]
        lines += [f"  {p} = {v:g}    # {DOC[p]}" for p, v in DEFAULTS.items()]
        for o in self.as_dict()["overrides"]:
            lines.append(f"  override {o['oracle']}.{o['branch']}.{o['param']} = {o['value']:g}  ({o['source']})")
        return "\n".join(lines)


def rule_dict(rule: Rule, floor: Optional[float] = None) -> dict[str, Any]:
    """The ``tolerance`` object of a result record."""
    d = asdict(rule)
    d["floor"] = floor
    d["text"] = rule.describe()
    return d


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def tolerance_table(cfg: dict[str, Any], cli_overrides: list[str], source_name: str = "config") -> ToleranceTable:
    """Defaults, then the config's ``[tolerance]`` section, then ``--tol`` overrides (CLI wins)."""
    table = ToleranceTable()
    section = cfg.get("tolerance", {})
    if not isinstance(section, dict):
        raise ToleranceError(f"the config's tolerance must be a table ([tolerance] KEY = number), got {section!r}")
    for key, value in _flatten(section).items():
        table.set(key, value, source_name)
    for text in cli_overrides:
        table.set_from_string(text, "cli")
    return table
