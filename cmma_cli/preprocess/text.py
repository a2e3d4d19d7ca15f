"""Clean text for the text encoder: one procedure text per synthesis recipe, and tidy descriptions.

A recipe (the text-mined / Materials Project layout) carries no full paragraph, only structured
fields and a ~100-character excerpt. :func:`compose_procedure` writes one faithful text from them::

    Solid-state synthesis of Ba2HoTaO6. Precursors: Ta2O5, BaCO3, Ho2O3.
    Reaction: 0.5 Ta2O5 + 2 BaCO3 + 0.5 Ho2O3 -> 1 Ba2HoTaO6 + 2 CO2.
    Procedure: dried at 100-1000 °C; ground in acetone; heated at 1200 °C for 12 h; ... .
    Excerpt: All materials were obtained from Aldrich ... after each 24 or 48 h heating period.

Operations keep their order and the word the paper used (``token``); temperatures are given in
whole °C (kelvin converted), times in h, min or s (days converted to hours), ranges as ``a-b unit``.
The excerpt is added only when it holds content words the composed text lacks. :func:`normalize_text` (also used
on descriptions) applies NFKC, one spelling per unit and per dash, and single spaces; it never touches
a token that starts with a letter, so chemical formulas pass through intact.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Iterable
from typing import Any

#: Characters NFKC leaves alone that have one plain spelling here.
_CHAR_MAP = str.maketrans(
    {
        "\u2010": "-", "\u2011": "-", "\u2012": "-", "\u2013": "-", "\u2014": "-", "\u2015": "-",
        "\u2212": "-", "\u22c5": "·", "\u2219": "·", "\u2022": "·", "\u201c": '"', "\u201d": '"',
        "\u2018": "'", "\u2019": "'", "\u00ba": "°", "\u02da": "°",
    }
)  # fmt: skip

_NUM = r"(?<![\w.])(\d+(?:\.\d+)?)"
_CELSIUS = r"(?:°\s*C|o\s*C|deg\.?\s*C|degrees?\s+C(?:elsius)?|degrees?\s+centigrade)(?![A-Za-z])"
_UNIT_PATTERNS = [
    (re.compile(_NUM + r"\s*" + _CELSIUS), r"\1 °C"),
    (re.compile(_NUM + r"\s*K(?:elvin)?(?![A-Za-z0-9])"), r"\1 K"),
    (re.compile(_NUM + r"\s*(?:h|hr|hrs|hour|hours)(?![A-Za-z])"), r"\1 h"),
    (re.compile(_NUM + r"\s*(?:min|mins|minute|minutes)(?![A-Za-z])"), r"\1 min"),
]
#: Free-text kelvin and day quantities (a range or one number), converted as the structured fields are: kelvin to
#: whole °C, days and weeks to hours. A bare "d" is left alone (``3 d orbitals``).
_KELVIN_TEXT = re.compile(_NUM + r"(?:\s*(?:-|~|to)\s*(\d+(?:\.\d+)?))?\s*(?:K|kelvin|Kelvin)(?![A-Za-z0-9])")
_DAYS_TEXT = re.compile(_NUM + r"(?:\s*(?:-|~|to)\s*(\d+(?:\.\d+)?))?\s*(days?|weeks?)(?![A-Za-z])", re.IGNORECASE)
_UNIT = r"(?=\s*(?:°C|K|h|min|s)(?![A-Za-z0-9]))"
_RANGE = re.compile(_NUM + r"\s*(?:-|~|to)\s*(\d+(?:\.\d+)?)" + _UNIT)
_SPACE_BEFORE_PUNCT = re.compile(r"\s+([,;:!?)\]])")
_SPACE_AFTER_OPEN = re.compile(r"([(\[])\s+")
_SPACE_BEFORE_STOP = re.compile(r"\s+\.(?=\s|$)")

#: Canonical time units, and the factor that takes each spelling there.
_TIME_UNITS = {
    "h": ("h", 1.0), "hr": ("h", 1.0), "hrs": ("h", 1.0), "hour": ("h", 1.0), "hours": ("h", 1.0),
    "min": ("min", 1.0), "mins": ("min", 1.0), "minute": ("min", 1.0), "minutes": ("min", 1.0),
    "s": ("s", 1.0), "sec": ("s", 1.0), "secs": ("s", 1.0), "second": ("s", 1.0), "seconds": ("s", 1.0),
    "d": ("h", 24.0), "day": ("h", 24.0), "days": ("h", 24.0), "week": ("h", 168.0), "weeks": ("h", 168.0),
}  # fmt: skip
_CELSIUS_SPELLINGS = {"c", "°c", "℃", "oc", "degc", "deg c", "celsius"}
_KELVIN_SPELLINGS = {"k", "kelvin"}

#: Words that say nothing about a procedure (when judging whether an excerpt adds anything).
_STOPWORDS = frozenset({
    "a", "an", "and", "are", "as", "at", "be", "by", "for", "from", "in", "into", "is", "it", "of", "on", "or",
    "the", "then", "this", "that", "to", "was", "were", "which", "with", "after", "before", "each", "all",
    "using", "used", "under",
})  # fmt: skip


def normalize_text(text: str | None) -> str:
    """Unicode, units, number ranges and whitespace put into one form; formulas are left intact."""
    if not text:
        return ""
    text = unicodedata.normalize("NFKC", str(text)).translate(_CHAR_MAP)
    text = _scrub(text)
    text = _KELVIN_TEXT.sub(_kelvin_to_celsius, text)
    text = _DAYS_TEXT.sub(_days_to_hours, text)
    for pattern, replacement in _UNIT_PATTERNS:
        text = pattern.sub(replacement, text)
    text = _RANGE.sub(r"\1-\2", text)
    text = " ".join(text.split())
    text = _SPACE_BEFORE_PUNCT.sub(r"\1", text)
    text = _SPACE_AFTER_OPEN.sub(r"\1", text)
    return _SPACE_BEFORE_STOP.sub(".", text).strip()


def _kelvin_to_celsius(match: re.Match) -> str:
    """``1073 K`` -> ``800 °C``, ``1073-1173 K`` -> ``800-900 °C`` (whole degrees, as the structured fields)."""
    numbers = [float(v) for v in match.groups() if v is not None]
    return "-".join(_number(float(round(v - 273.15))) for v in numbers) + " °C"


def _days_to_hours(match: re.Match) -> str:
    """``3 days`` -> ``72 h``, ``1-2 weeks`` -> ``168-336 h`` (as the structured fields)."""
    first, second, unit = match.groups()
    factor = _TIME_UNITS[unit.lower()][1]
    return "-".join(_number(float(v) * factor) for v in (first, second) if v is not None) + " h"


def _scrub(text: str) -> str:
    """Control characters (tabs, newlines) become spaces; format, private-use and unassigned ones go."""
    return "".join(
        " " if cat == "Cc" else ("" if cat[0] == "C" else ch)
        for ch, cat in ((c, unicodedata.category(c)) for c in text)
    )


def _formula(text: Any) -> str:
    """A chemical formula: NFKC and one spelling per dash / dot, no other change (spaces, control and
    private-use characters removed)."""
    if not text:
        return ""
    return "".join(_scrub(unicodedata.normalize("NFKC", str(text)).translate(_CHAR_MAP)).split())


def _number(value: float) -> str:
    if float(value).is_integer():
        return str(int(value))
    return f"{value:.6f}".rstrip("0").rstrip(".")


def _float(value: Any) -> float | None:
    """A number, or ``None`` for a missing or unreadable one (a bad value drops, not the recipe)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(number) else number


def _as_list(value: Any) -> list:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


def _quantity(entry: dict, kind: str) -> str:
    """One temperature or time entry (``values``/``min_value``/``max_value``/``units``) as text."""
    if not isinstance(entry, dict):
        return ""
    unit = str(entry.get("units") or "").strip()
    low, high = _float(entry.get("min_value")), _float(entry.get("max_value"))
    values = [v for v in map(_float, _as_list(entry.get("values"))) if v is not None]
    if low is not None and high is not None and low != high:
        numbers, sep = [low, high], "-"
    elif values:
        numbers, sep = list(dict.fromkeys(values)), ", "
    elif high is not None or low is not None:
        numbers, sep = [high if high is not None else low], ""
    else:
        return ""
    if kind == "temperature":
        key = unit.lower()
        if key in _KELVIN_SPELLINGS:
            numbers, unit = [v - 273.15 for v in numbers], "°C"
        elif key in _CELSIUS_SPELLINGS:
            unit = "°C"
        # whole degrees: the sources' precision (kelvin values converted upstream end in .85 / .15)
        numbers = [float(round(v)) for v in numbers]
    else:
        unit, factor = _TIME_UNITS.get(unit.lower(), (unit, 1.0))
        numbers = [v * factor for v in numbers]
    return f"{sep.join(_number(v) for v in numbers)} {unit}".strip()


def _phrase(items: Iterable[Any], prefix: str) -> str:
    words = [normalize_text(str(x)) for x in items if x and str(x).strip()]
    words = list(dict.fromkeys(w for w in words if w))
    return f"{prefix} {' and '.join(words)}" if words else ""


def describe_operation(op: dict) -> str:
    """One operation: the paper's verb, then its temperature, time, atmosphere, medium and device."""
    verb = normalize_text(op.get("token") or "") or _verb_from_type(op.get("type"))
    cond = op.get("conditions") or {}
    temps = [q for q in (_quantity(e, "temperature") for e in _as_list(cond.get("heating_temperature"))) if q]
    times = [q for q in (_quantity(e, "time") for e in _as_list(cond.get("heating_time"))) if q]
    parts = [
        verb,
        f"at {' and '.join(temps)}" if temps else "",
        f"for {' and '.join(times)}" if times else "",
        _phrase(_as_list(cond.get("heating_atmosphere")), "in"),
        _phrase(_as_list(cond.get("mixing_media")), "in"),
        _phrase(_as_list(cond.get("mixing_device")), "using"),
    ]
    return " ".join(p for p in parts if p)


def _verb_from_type(kind: Any) -> str:
    """``HeatingOperation`` -> ``heating`` for operations that lost their token."""
    words = re.findall(r"[A-Z][a-z]+", str(kind or ""))
    words = [w.lower() for w in words if w != "Operation"]
    return " ".join(words) or "processed"


def _target(record: dict, target_formula: str | None) -> str:
    target = record.get("target") or {}
    name = _formula(target.get("material_formula") or target.get("material_string") or target_formula)
    if not name:
        targets = _as_list(record.get("targets_string") or record.get("targets_formula"))
        name = _formula(targets[0]) if targets else "an unnamed target"
    notes = []
    for var, spec in (target.get("amounts_vars") or {}).items():
        values = spec.get("values") if isinstance(spec, dict) else spec
        values = sorted(dict.fromkeys(float(v) for v in _as_list(values) if v is not None))
        if values:
            notes.append(f"{var} = {', '.join(_number(v) for v in values)}")
    for var, values in (target.get("elements_vars") or {}).items():
        if _as_list(values):
            notes.append(f"{var} = {', '.join(str(v) for v in _as_list(values))}")
    additives = [a for a in _as_list(target.get("additives")) if a]
    if additives:
        notes.append("doped with " + ", ".join(_formula(a) for a in additives))
    return f"{name} ({'; '.join(notes)})" if notes else name


def _precursors(record: dict) -> list[str]:
    names = []
    for p in _as_list(record.get("precursors")):
        if isinstance(p, dict):
            name = _formula(p.get("material_formula") or p.get("material_string"))
        else:
            name = _formula(p)
        if name:
            names.append(name)
    return list(dict.fromkeys(names))


def _reaction(record: dict) -> str:
    text = record.get("reaction_string") or ""
    if not text.strip():
        return ""
    text = unicodedata.normalize("NFKC", text).translate(_CHAR_MAP)
    text = re.sub(r"\s*==\s*", " -> ", _scrub(text))
    return " ".join(text.split()).rstrip(";. ")


def _content_words(text: str) -> set[str]:
    return {w for w in re.findall(r"[a-z][a-z-]{2,}", text.lower()) if w not in _STOPWORDS}


def excerpt(paragraph: str | None) -> str:
    """The paragraph excerpt without the words its cuts broke (``head <...> tail`` -> ``head ... tail``)."""
    if not paragraph:
        return ""
    parts = paragraph.split("<...>")
    if len(parts) == 1:
        return normalize_text(parts[0])
    # The sol-gel layout pads the marker with one space each side (" <...> "), the solid-state one does
    # not ("<...>"); past the padding, a word that touches a cut may be a broken one, so it goes.
    head, tail = parts[0], parts[-1]
    if head.endswith(" ") and tail.startswith(" "):
        head, tail = head[:-1], tail[1:]
    if head and not head[-1].isspace():
        head = head.rsplit(None, 1)[0] if len(head.split()) > 1 else ""
    if tail and not tail[0].isspace():
        tail = tail.split(None, 1)[1] if len(tail.split()) > 1 else ""
    pieces = [normalize_text(p) for p in (head, tail) if p.strip()]
    return " ... ".join(p for p in pieces if p)


def compose_procedure(record: dict, synthesis_type: str | None = None, target_formula: str | None = None) -> str:
    """One clean procedure text from a recipe's structured fields (see the module docstring)."""
    kind = normalize_text(record.get("synthesis_type") or synthesis_type or "")
    head = f"{kind[:1].upper()}{kind[1:]} synthesis of" if kind else "Synthesis of"
    sentences = [f"{head} {_target(record, target_formula)}."]
    precursors = _precursors(record)
    if precursors:
        sentences.append(f"Precursors: {', '.join(precursors)}.")
    reaction = _reaction(record)
    if reaction:
        sentences.append(f"Reaction: {reaction}.")
    steps = [
        s for s in (describe_operation(op) for op in _as_list(record.get("operations")) if isinstance(op, dict)) if s
    ]
    if steps:
        sentences.append(f"Procedure: {'; '.join(steps)}.")
    composed = " ".join(sentences)
    extra = excerpt(record.get("paragraph_string"))
    if len(_content_words(extra) - _content_words(composed)) >= 2:
        composed += f" Excerpt: {extra.rstrip('.')}."
    return composed
