"""Incidents of a stress run, detected live from what the run records.

The orchestration feeds an `IncidentDetector` each seconds.jsonl row (`IncidentDetector.on_second`)
and each rotations.jsonl row (`IncidentDetector.on_rotation`) as it writes them, and calls
`IncidentDetector.finish` at the end; every call returns the incidents it closed (also kept in
``detector.incidents`` and passed to ``on_incident``), which the orchestration appends to
incidents.jsonl with `write_incident`. At the very end it adds `threshold_incidents` for the
``--fail-on`` limits crossed. An incident is ``{"t", "end", "kind", "message", "evidence"}``
(incidents.jsonl's row; ``end`` None for one that happened at an instant), its message one line.

The kinds (`KINDS`):

- ``rotation-late``: a rotation still running ``interval`` seconds after its start (the
  ``rotate_every`` given to the detector), raised once per rotation at that deadline
  (``t`` = start + interval, ``end`` None) as soon as the run's clock passes it, or when the
  orchestration records a ``late`` event for it. The run's clock is the latest rotation event's
  time and the *start* of the latest second reported (a second's row arrives after the second
  ended; its start leaves a rotation event in flight a second to arrive).
- ``rotation-failed``: a ``failed`` rotation event (``end`` None). A rotation can be late and
  then fail: two incidents.
- ``version-refused``: in a second, operations were refused (``version_disabled`` or
  ``not_found``, the row's ``refused`` samples) for a key version ``v`` while no operation that
  second succeeded on a version newer than ``v``: the version went away with no successor in
  use. A refusal of ``v`` while a newer version served ops in the same second is *not* an
  incident: the workload is already on the successor and the refused op carried a stale version
  (a cached primary, or a ciphertext of the harness's own that no rotation re-wraps); such
  refusals are counted in ``detector.stale_refusals`` (by version) and listed in the evidence of
  a version-refused incident of the same seconds. The test is per second, so at a very low rate
  a second whose only ops were stale refusals counts as an incident.
- ``no-usable-version``: a second in which ops were attempted (not dropped) and none succeeded,
  at least half of them refused for their version.
- ``threshold``: a ``--fail-on`` limit crossed (`threshold_incidents`, at the end of the run).

Consecutive seconds of one kind are one incident from the start of its first second to the end
of its last (``end`` = last second + 1); a second with no op completed neither breaks nor
extends it. A lasting incident is returned when it closes: at the first second without it, or at
`IncidentDetector.finish`. Evidence holds counts, versions, up to `MAX_SAMPLES` refused-op
samples, rotation ids and phases: never key material.
"""

from __future__ import annotations

import json
import math
import os
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

ROTATION_LATE: Final = "rotation-late"
ROTATION_FAILED: Final = "rotation-failed"
VERSION_REFUSED: Final = "version-refused"
NO_USABLE_VERSION: Final = "no-usable-version"
THRESHOLD: Final = "threshold"
KINDS: Final = (ROTATION_LATE, ROTATION_FAILED, VERSION_REFUSED, NO_USABLE_VERSION, THRESHOLD)

REFUSALS: Final = ("version_disabled", "not_found")
"""Outcome classes that mean the key version was refused."""
MAX_SAMPLES: Final = 10
"""Refused-op samples kept in an incident's evidence."""
MAX_TEXT: Final = 160
"""Longest text taken from a recorded row (a rotation's failure message, an id) into a message."""
FINISHED: Final = ("done", "failed", "unfinished")

Incident = dict[str, Any]


def one_line(value: Any, limit: int = MAX_TEXT) -> str:
    """``value`` as text on one line of at most ``limit`` characters (no controls)."""
    text = "".join(c if c.isprintable() else " " for c in str(value)[: limit + 1]).strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def _int(value: Any) -> int:
    number = _number(value)
    return int(number) if number is not None else 0


def _version(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError, OverflowError):
        return None


def _versions(text: Iterable[int]) -> str:
    return ", ".join(str(v) for v in sorted(text))


@dataclass
class _Rotation:
    rotation_id: str
    started: float | None = None
    phase: str = ""
    rewrapped: int = 0
    total: int = 0
    finished: bool = False
    late: bool = False


@dataclass
class _Span:
    """An incident lasting over consecutive seconds, still open."""

    kind: str
    t: float
    end: float
    seconds: int = 0
    attempted: int = 0
    ok: int = 0
    refused: Counter[int] = field(default_factory=Counter)
    """Sampled refusals by key version (the incident's)."""
    stale: Counter[int] = field(default_factory=Counter)
    refusals: int = 0
    """Refused ops counted in the rows' outcomes (all of them, not only sampled)."""
    outcomes: Counter[str] = field(default_factory=Counter)
    ok_versions: Counter[int] = field(default_factory=Counter)
    samples: list[list[Any]] = field(default_factory=list)


class IncidentDetector:
    """Incidents of one run, fed live (see the module's docstring). Thread-safe: the seconds and
    the rotation events may come from different threads.

    ``rotate_every``: a rotation's interval in seconds (None: no lateness from time, only the
    orchestration's ``late`` events). ``grace``: seconds past the interval before a running
    rotation counts as late. ``on_incident``: called with each incident as it is raised (under
    the detector's lock; keep it short, e.g. `write_incident`)."""

    def __init__(
        self,
        rotate_every: float | None = None,
        *,
        grace: float = 0.0,
        on_incident: Callable[[Incident], None] | None = None,
    ) -> None:
        if rotate_every is not None and not (math.isfinite(rotate_every) and rotate_every > 0):
            raise ValueError("rotate_every must be a positive number of seconds")
        self.rotate_every = rotate_every
        self.grace = grace
        self.on_incident = on_incident
        self.incidents: list[Incident] = []
        self.stale_refusals: Counter[int] = Counter()
        """Refusals of a version older than one serving ops the same second (sampled counts)."""
        self._rotations: dict[str, _Rotation] = {}
        self._spans: dict[str, _Span] = {}
        self._clock = 0.0
        self._finished = False
        self._lock = threading.Lock()

    # -- feeding ---------------------------------------------------------------------------

    def on_second(self, row: Mapping[str, Any]) -> list[Incident]:
        """One seconds.jsonl row (in order). Returns the incidents it closed or raised."""
        with self._lock:
            new: list[Incident] = []
            t = _number(row.get("t"))
            if t is None:
                return new
            raw = row.get("outcomes")
            outcomes: Mapping[str, Any] = raw if isinstance(raw, Mapping) else {}
            done = _int(row.get("done"))
            ok = _int(row.get("ok"))
            attempted = done - _int(outcomes.get("dropped"))
            refusals = sum(_int(outcomes.get(name)) for name in REFUSALS)
            ok_versions = self._ok_versions(row.get("versions"))
            newest = max(ok_versions, default=None)
            samples = self._samples(row.get("refused"))
            bad = [s for s in samples if newest is None or s[2] >= newest]
            stale = [s for s in samples if newest is not None and s[2] < newest]
            self.stale_refusals.update(s[2] for s in stale)

            if attempted > 0:
                if bad:
                    self._extend(
                        VERSION_REFUSED, t, attempted, ok, refusals, outcomes, ok_versions, bad, stale
                    )
                else:
                    new += self._close(VERSION_REFUSED)
                if ok == 0 and refusals > 0 and 2 * refusals >= attempted:
                    self._extend(
                        NO_USABLE_VERSION, t, attempted, ok, refusals, outcomes, ok_versions, samples, []
                    )
                else:
                    new += self._close(NO_USABLE_VERSION)
            new += self._advance(t)
            return self._raise(new)

    def on_rotation(self, event: Mapping[str, Any]) -> list[Incident]:
        """One rotations.jsonl row (in order). Returns the incidents it raised."""
        with self._lock:
            new: list[Incident] = []
            t = _number(event.get("t"))
            if t is None:
                return new
            rid = one_line(event.get("rotation_id", "?"), 64)
            rotation = self._rotations.setdefault(rid, _Rotation(rid))
            kind = event.get("event")
            if kind == "start" and rotation.started is None:
                rotation.started = t
            if isinstance(event.get("phase"), str) and event["phase"]:
                rotation.phase = one_line(event["phase"], 40)
            if _number(event.get("rewrapped")) is not None:
                rotation.rewrapped = _int(event.get("rewrapped"))
            if _number(event.get("total")) is not None:
                rotation.total = _int(event.get("total"))
            if not rotation.finished:
                # a rotation that ends after its deadline was late first
                new += self._advance(t)
            if kind == "late" and not rotation.late and not rotation.finished:
                new.append(self._late(rotation, t))
            if kind == "failed" and not rotation.finished:
                new.append(self._failed(rotation, t, event.get("message")))
            if kind in FINISHED:
                rotation.finished = True
            return self._raise(new)

    def finish(self, t_end: float) -> list[Incident]:
        """The end of the run at ``t_end`` (s since t0): closes the lasting incidents and raises
        the lateness of rotations still running past their deadline. Once only."""
        with self._lock:
            if self._finished:
                return []
            self._finished = True
            new = self._advance(t_end)
            for kind in list(self._spans):
                new += self._close(kind, t_end)
            return self._raise(new)

    # -- internals -------------------------------------------------------------------------

    def _raise(self, new: list[Incident]) -> list[Incident]:
        new.sort(key=lambda incident: incident["t"])
        for incident in new:
            self.incidents.append(incident)
            if self.on_incident is not None:
                self.on_incident(incident)
        return new

    @staticmethod
    def _ok_versions(value: Any) -> Counter[int]:
        versions: Counter[int] = Counter()
        if isinstance(value, Mapping):
            for key, count in value.items():
                version = _version(key)
                if version is not None and _int(count) > 0:
                    versions[version] += _int(count)
        return versions

    @staticmethod
    def _samples(value: Any) -> list[list[Any]]:
        samples = []
        if isinstance(value, list):
            for item in value:
                if not isinstance(item, list | tuple) or len(item) < 4:
                    continue
                version = _version(item[2])
                if version is None or item[3] not in REFUSALS:
                    continue
                at = _number(item[0])
                samples.append([at, one_line(item[1], 16), version, item[3]])
        return samples

    def _extend(
        self,
        kind: str,
        t: float,
        attempted: int,
        ok: int,
        refusals: int,
        outcomes: Mapping[str, Any],
        ok_versions: Counter[int],
        refused: Sequence[list[Any]],
        stale: Sequence[list[Any]],
    ) -> None:
        span = self._spans.get(kind)
        if span is None:
            span = self._spans[kind] = _Span(kind=kind, t=t, end=t + 1)
        span.end = t + 1
        span.seconds += 1
        span.attempted += attempted
        span.ok += ok
        span.refusals += refusals
        span.outcomes.update({str(k): _int(v) for k, v in outcomes.items() if str(k) != "ok" and _int(v) > 0})
        span.ok_versions.update(ok_versions)
        span.refused.update(s[2] for s in refused)
        span.stale.update(s[2] for s in stale)
        room = MAX_SAMPLES - len(span.samples)
        span.samples.extend(refused[: max(0, room)])

    def _close(self, kind: str, t_end: float | None = None) -> list[Incident]:
        span = self._spans.pop(kind, None)
        if span is None:
            return []
        end = span.end if t_end is None else max(span.t, min(span.end, t_end))
        evidence: dict[str, Any] = {
            "seconds": span.seconds,
            "attempted": span.attempted,
            "ok": span.ok,
            "refused": span.refusals,  # every refusal of those seconds (the rows' outcomes)
            "refused_versions": {str(v): n for v, n in sorted(span.refused.items())},
            "ok_versions": {str(v): n for v, n in sorted(span.ok_versions.items())},
            "errors": dict(sorted(span.outcomes.items())),
            "samples": span.samples,
        }
        if kind == VERSION_REFUSED:
            evidence["stale_refusals"] = {str(v): n for v, n in sorted(span.stale.items())}
            newest = max(span.ok_versions, default=None)
            serving = f"newest version serving {newest}" if newest is not None else "no version serving"
            message = (
                f"key version {_versions(span.refused)} refused with no successor in use ({serving}) "
                f"over {span.seconds} s: {span.refusals} operation(s) refused in all"
            )
        else:
            message = (
                f"no usable key version for {span.seconds} s: {span.attempted} operation(s) attempted, "
                f"0 succeeded, {span.refusals} refused for their version"
            )
        return [{"t": span.t, "end": end, "kind": kind, "message": message, "evidence": evidence}]

    def _advance(self, now: float) -> list[Incident]:
        """Moves the clock to ``now``; the running rotations past their deadline are late."""
        self._clock = max(self._clock, now)
        new: list[Incident] = []
        if self.rotate_every is None:
            return new
        for rotation in self._rotations.values():
            if rotation.finished or rotation.late or rotation.started is None:
                continue
            deadline = rotation.started + self.rotate_every
            if self._clock >= deadline + self.grace:
                new.append(self._late(rotation, deadline))
        return new

    def _late(self, rotation: _Rotation, t: float) -> Incident:
        rotation.late = True
        progress = f", {rotation.rewrapped}/{rotation.total} re-wrapped" if rotation.total else ""
        interval = f" (interval {self.rotate_every:g} s)" if self.rotate_every is not None else ""
        phase = rotation.phase or "unknown phase"
        return {
            "t": t,
            "end": None,
            "kind": ROTATION_LATE,
            "message": f"rotation {rotation.rotation_id} not finished in time{interval}: "
            f"in {phase}{progress}",
            "evidence": {
                "rotation_id": rotation.rotation_id,
                "started": rotation.started,
                "interval": self.rotate_every,
                "phase": rotation.phase,
                "rewrapped": rotation.rewrapped,
                "total": rotation.total,
            },
        }

    def _failed(self, rotation: _Rotation, t: float, message: Any) -> Incident:
        reason = one_line(message) if message else ""
        phase = rotation.phase or "unknown phase"
        return {
            "t": t,
            "end": None,
            "kind": ROTATION_FAILED,
            "message": f"rotation {rotation.rotation_id} failed in {phase}"
            + (f": {reason}" if reason else ""),
            "evidence": {
                "rotation_id": rotation.rotation_id,
                "started": rotation.started,
                "phase": rotation.phase,
                "rewrapped": rotation.rewrapped,
                "total": rotation.total,
                "late": rotation.late,
                "reason": reason,
            },
        }


def threshold_incidents(evaluated: Sequence[Mapping[str, Any]], t_end: float) -> list[Incident]:
    """One ``threshold`` incident at ``t_end`` per evaluated ``--fail-on`` threshold that is
    not ok (`rekey.stress.thresholds.evaluate`'s dicts); the evidence has the expression, the
    value and the period it was measured over (the whole run)."""
    incidents = []
    for result in evaluated:
        if result.get("ok"):
            continue
        expr = one_line(result.get("expr", "?"), 80)
        value = _number(result.get("value"))
        unit = one_line(result.get("unit") or "", 8)
        measured = f"measured {value:g}{unit}" if value is not None else "not measured (no value)"
        incidents.append(
            {
                "t": t_end,
                "end": None,
                "kind": THRESHOLD,
                "message": f"threshold {expr} crossed: {measured}",
                "evidence": {"expr": expr, "value": value, "unit": unit, "period": [0.0, t_end]},
            }
        )
    return incidents


_write_lock = threading.Lock()


def write_incident(path: Path, incident: Mapping[str, Any]) -> None:
    """Appends ``incident`` to incidents.jsonl at ``path`` as one JSON line, flushed and synced
    before returning, so a crash later keeps it. A last line left cut short by an earlier crash
    is dropped first (it would otherwise glue onto this one). Safe from several threads."""
    if incident.get("kind") not in KINDS:
        raise ValueError(f"not an incident kind: {one_line(incident.get('kind'), 40)}")
    line = json.dumps(dict(incident), allow_nan=False, separators=(",", ":"), default=str) + "\n"
    with _write_lock, open(path, "a+b") as file:
        size = file.seek(0, os.SEEK_END)
        if size:
            file.seek(size - 1)
            if file.read(1) != b"\n":
                file.seek(0)
                data = file.read()
                file.truncate(data.rfind(b"\n") + 1)
                file.seek(0, os.SEEK_END)
        file.write(line.encode("utf-8"))
        file.flush()
        os.fsync(file.fileno())
