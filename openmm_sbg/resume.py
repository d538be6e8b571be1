"""The one check every resumable run makes before it continues: are these the settings it was started with?"""

from __future__ import annotations

import json
import time


def check_resume_settings(where: str, saved: dict, settings: dict,
                          remedy: str = "delete that folder to start over, or rerun with the same settings to resume it",
                          what: str = "settings") -> None:
    """Refuse to resume the run kept at ``where`` if its stored ``saved`` settings differ from ``settings``.

    Both are compared as JSON stores them (tuples become lists, numpy scalars are not
    expected). The error says the run has other ``what``, names each setting that differs,
    nested keys joined by dots, then says ``remedy``.
    """
    saved, settings = json.loads(json.dumps(saved)), json.loads(json.dumps(settings))
    if saved == settings:
        return
    differences = [f"{key}: {old!r} then, {new!r} now" for key, old, new in _differences(saved, settings)]
    raise ValueError(f"{where} holds a run with other {what} ({'; '.join(differences)}); {remedy}")


def without_later_settings(values: dict, old_behaviour: dict) -> dict:
    """``values`` less each setting added after runs were first stored, while it holds its old behaviour's value.

    ``old_behaviour`` maps such a setting to the value that means "as before it existed". A run
    stored before the setting existed then compares equal to the same run started today, so
    it resumes; any other value is kept, and a changed setting is reported.
    """
    return {key: value for key, value in values.items() if key not in old_behaviour or value != old_behaviour[key]}


def _differences(old, new, prefix: str = ""):
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            yield from _differences(old.get(key), new.get(key), f"{prefix}{key}.")
    elif old != new:
        yield prefix.rstrip("."), old, new


class RunClock:
    """Wall-clock of a resumable run over all its calls: the earlier calls' (to their last commit) plus this call's.

    ``earlier`` is what the run's last commit stored, 0 for a new run, or ``None`` for a run begun
    before its wall-clock was kept, whose whole time is then unknown. Each commit stores
    :meth:`whole_run`, so a call that dies loses only the time since its last commit.
    """

    def __init__(self, earlier: float | None):
        self.earlier, self._start = earlier, time.perf_counter()

    def this_call(self) -> float:
        return time.perf_counter() - self._start

    def whole_run(self, this_call: float | None = None) -> float | None:
        """The whole run's wall-clock so far (``this_call`` as measured, else now)."""
        if self.earlier is None:
            return None
        return self.earlier + (self.this_call() if this_call is None else this_call)
