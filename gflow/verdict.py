"""What a check may say about a claim: the ``Verdict`` type, its outcomes and the checks'
names, shared by ``gflow.theory``, ``gflow.optimality``, the run table, ``gflow check``
and the tests (docs/theory.md, "What a verdict may claim").

Outcomes:

* ``PASS``: the run's evidence agrees with the claim at the resolution the check states.
* ``FAIL``: the evidence excludes the claim at its stated level *and* the check's
  resolution is fine enough to tell the tested deviation apart. Only an in-scope FAIL
  makes ``gflow run`` and ``gflow check`` exit 1.
* ``INCONCLUSIVE``: the run reaches the claim's regime, but its data cannot decide (an
  interval wider than the resolution, a window too short); ``decide`` says what would
  (a longer horizon, more save points, snapshots).
* ``OUTSIDE``: the claim's theorem does not cover the run (an assumption fails, measured
  where it can be); what was observed is kept, it is not a failure.
* ``n/a``: the run does not reach the claim's regime, or the check cannot be computed
  (the reason says which).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

__all__ = [
    "Verdict", "PASS", "FAIL", "INCONCLUSIVE", "OUTSIDE", "NA", "OUTCOMES", "outside",
    "inconclusive", "failed", "MONOTONE", "RHO_INCREASING", "RATES", "FIDELITY", "DIRECTION",
    "ALIGNMENT", "LOCAL_OPTIMUM", "KKT_FALLING", "LYU21",
]  # fmt: skip

PASS, FAIL, INCONCLUSIVE, OUTSIDE, NA = "PASS", "FAIL", "INCONCLUSIVE", "OUTSIDE", "n/a"
OUTCOMES = (PASS, FAIL, INCONCLUSIVE, OUTSIDE, NA)

# the checks' names, as the run table, checks.json and gflow check print them
MONOTONE = "margin monotone"
RHO_INCREASING = "rho increasing"
RATES = "rates"
FIDELITY = "flow fidelity"
DIRECTION = "direction converges"
ALIGNMENT = "alignment"
LOCAL_OPTIMUM = "local optimum"
KKT_FALLING = "KKT eps falling"
LYU21 = "linear max-margin (Lyu et al. 2021)"


@dataclass
class Verdict:
    """One claim's verdict on one run.

    ``passed``: ``True`` (PASS), ``False`` (FAIL) or ``None`` (no decision: n/a, or
    INCONCLUSIVE when ``decide`` is set, or OUTSIDE when ``outside`` is set). ``summary``:
    one line of what the check read; ``details``: JSON-able. ``outside``: why the claim's
    theorem does not cover the run (``details["observed"]`` keeps the would-be result).
    ``decide``: for an INCONCLUSIVE verdict, what would decide it."""

    name: str
    passed: bool | None
    summary: str
    details: dict = field(default_factory=dict)
    outside: str | None = None
    decide: str | None = None

    def to_dict(self) -> dict:
        return {**asdict(self), "outcome": self.outcome}

    @classmethod
    def from_dict(cls, d: dict) -> Verdict:
        """A verdict read back from ``checks.json`` (``to_dict``'s output)."""
        keys = ("name", "passed", "summary", "details", "outside", "decide")
        return cls(**{k: d[k] for k in keys if k in d})

    @property
    def outcome(self) -> str:
        """One of ``OUTCOMES``."""
        if self.outside:
            return OUTSIDE
        if self.passed is None:
            return INCONCLUSIVE if self.decide else NA
        return PASS if self.passed else FAIL

    @property
    def mark(self) -> str:
        """The outcome as the run table prints it."""
        return {OUTSIDE: "outside", PASS: "pass", INCONCLUSIVE: "inconclusive"}.get(
            self.outcome, self.outcome
        )

    @property
    def failed(self) -> bool:
        """An in-scope FAIL: what makes the command exit 1."""
        return self.outcome == FAIL

    def __str__(self) -> str:
        if self.outside:
            why = f"outside the theory ({self.outside})"
            return f"[OUTSIDE] {self.name}: {why}; observed: {self.summary}"
        if self.decide:
            return f"[INCONCLUSIVE] {self.name}: {self.summary}; to decide it: {self.decide}"
        return f"[{self.outcome}] {self.name}: {self.summary}"


def outside(verdict: Verdict, why: str) -> Verdict:
    """``verdict`` marked as outside its theorem's scope for reason ``why``: what it read
    stays in ``summary``, its would-be result in ``details["observed"]``."""
    det = {**verdict.details, "observed": verdict.outcome}
    return Verdict(verdict.name, None, verdict.summary, det, outside=why)


def inconclusive(name: str, summary: str, decide: str, details: dict | None = None) -> Verdict:
    """An INCONCLUSIVE verdict: the run is in the claim's regime, its data cannot decide;
    ``decide``: what would."""
    return Verdict(name, None, summary, dict(details or {}), decide=decide)


def failed(verdicts) -> bool:
    """Whether any verdict is an in-scope FAIL (the exit code's rule: 1 exactly then)."""
    return any(v.failed for v in verdicts)
