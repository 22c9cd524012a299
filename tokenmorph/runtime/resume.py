"""What a resume may change: the settings a run folder's checkpoint was written with against the
new invocation's, key by key, and the data set's fingerprint.

Every config field says how it may change (its field metadata ``resume``, next to the field in
:mod:`tokenmorph.recipes.config`):

* :data:`FREE`: does not change what is trained (logging, saving, workers, device, accumulation
  split, stop_after, the data's path): accepted, and logged;
* :data:`FIXED`: the model was built with it (size, patch, teacher, framework, ...): a change
  needs another run folder;
* unmarked (:data:`MEANING`): changes the run's meaning (optimiser, schedule, length, seed,
  objective settings); refused, unless the invocation applies the changes from the current step
  (``apply_changes=true``, the ``--apply-changes`` flag). Applied changes follow one rule: the
  run goes on exactly as a run configured with the new values from its start would at this step
  (every schedule is a function of the step and the config, so it is rebuilt from the new
  values), with this run's weights and optimiser moments. See docs/reliability.md.

A changed data set (its fingerprint, :mod:`tokenmorph.data.fingerprint`) is a change of meaning.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError

__all__ = [
    "FREE",
    "FIXED",
    "MEANING",
    "DATA_KEY",
    "Change",
    "resume_kind",
    "keys_of_kind",
    "config_changes",
    "check_changes",
]

FREE, FIXED, MEANING = "free", "fixed", "meaning"
DATA_KEY = "data set"  # the name a changed data fingerprint goes by


@dataclass(frozen=True)
class Change:
    """One setting that differs between a run's checkpoint and the new invocation."""

    key: str
    old: Any
    new: Any
    kind: str  # FREE, FIXED or MEANING

    def __str__(self) -> str:
        def show(v):
            return v if isinstance(v, str) and self.key == DATA_KEY else repr(v)

        return f"{self.key}: {show(self.old)} -> {show(self.new)}"

    def record(self) -> dict:
        """JSON-ready: for the run history."""
        return {"key": self.key, "old": self.old, "new": self.new, "kind": self.kind}


def resume_kind(f: dataclasses.Field) -> str:
    """How the config field ``f`` may change on resume: FREE, FIXED or MEANING (unmarked)."""
    return f.metadata.get("resume", MEANING)


def keys_of_kind(cfg, kind: str) -> tuple[str, ...]:
    """The names of ``cfg``'s fields of one kind (e.g. FIXED: what a checkpoint must share)."""
    return tuple(f.name for f in dataclasses.fields(cfg) if resume_kind(f) == kind)


def _default(f: dataclasses.Field):
    return f.default if f.default_factory is dataclasses.MISSING else f.default_factory()


def config_changes(stored: dict, cfg) -> list[Change]:
    """The fields of the config dataclass ``cfg`` whose values differ from ``stored`` (a
    checkpoint's ``config``, ``cfg.to_dict()`` when it was written), in field order. A key the
    stored config lacks (written by an older version) counts as its default; stored keys this
    version does not know are ignored."""
    new = cfg.to_dict()
    out = []
    for f in dataclasses.fields(cfg):
        old = stored.get(f.name, _default(f))
        if old != new[f.name]:
            out.append(Change(f.name, old, new[f.name], resume_kind(f)))
    return out


def check_changes(changes: list[Change], where: str, step: int, apply: bool) -> None:
    """Refuse the changes a resume of ``where`` at ``step`` may not make: every FIXED one, and
    the MEANING ones unless ``apply``. The ``ConfigError`` lists one changed key per line
    (old -> new) and the ways out."""
    fixed = [c for c in changes if c.kind == FIXED]
    meaning = [c for c in changes if c.kind == MEANING]
    refused = fixed + ([] if apply else meaning)
    if not refused:
        return
    lines = [
        f"  {c}" + ("  (the model is built from it)" if c.kind == FIXED else "") for c in refused
    ]
    if fixed:
        way_out = "use another --output-dir for a run with these settings, or the run's own"
    else:
        way_out = (
            "use another --output-dir for a new run, or add --apply-changes (apply_changes=true) "
            f"to train on with the new values from step {step}: schedules are rebuilt from them "
            "(docs/reliability.md) and the change is recorded in run_history.jsonl"
        )
    raise ConfigError(
        f"the run in {where} (step {step}) was trained with other settings:\n"
        + "\n".join(lines)
        + f"\n{way_out}"
    )
