"""The settings ``selfnpo compare`` runs: a guidance rule, a negative branch, or PAG.

On the command line a setting is ``[LABEL=]PART[+PART]``, settings separated by commas::

    cfg, negative_prompt, cfg_rescale:0.7, interval:0.28-5.42, apg:0:15:-0.5, cfg_zero_star:1,
    pag:3, autoguidance:WEAK_MODEL, diffusion_npo:OFFSET:1, self_npo:OFFSET:1,
    self_npo:OFFSET:1+apg, mine=self_npo:OFFSET+cfg_zero_star:0

A PART is a rule (``cfg``, ``cfg_rescale[:PHI]``, ``interval[:LO-HI]``,
``apg[:ETA[:R[:MOMENTUM]]]``, ``cfg_zero_star[:ZERO_INIT_STEPS[:USE_S*]]``), a negative branch
(``negative_prompt``, ``self_npo:OFFSET[:BETA]``, ``diffusion_npo:OFFSET[:BETA]``,
``npo:OFFSET[:BETA]``, ``autoguidance:WEAK_MODEL``) or ``pag[:SCALE]``. A setting has at most one
rule and one negative branch; PAG runs alone. ``--settings FILE.json`` reads a list of such
strings or of objects with the fields of :class:`Setting` (for paths holding ``,`` ``:`` or ``+``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path

from ..errors import SelfNPOError
from .hook import RULES

OFFSET_KINDS = ("self_npo", "diffusion_npo", "npo")
NEGATIVES = ("none", "negative_prompt", "autoguidance", *OFFSET_KINDS)


@dataclass(frozen=True)
class Setting:
    """One column of the comparison; every setting shares prompts, seeds, steps and g."""

    label: str
    rule: str = "cfg"  # a key of RULES
    rule_args: dict = field(default_factory=dict)  # the rule's keyword arguments
    negative: str = "none"  # what the negative branch runs: one of NEGATIVES
    offset: str = ""  # offset file/folder (npo kinds) or the weak model folder (autoguidance)
    beta: float = 1.0  # scale of the offset in the negative branch
    pag_scale: float = 0.0  # > 0: diffusers' PAG pipeline with this perturbed-attention scale

    def key(self) -> dict:
        """Everything that changes the images (the label does not)."""
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "label"}
        d["rule_args"] = {k: float(v) for k, v in sorted(self.rule_args.items())}
        return d


def _floats(args: list[str], part: str) -> list[float]:
    try:
        return [float(x) for x in args]
    except ValueError:
        raise SelfNPOError(f"setting {part!r}: arguments must be numbers") from None


def _rule_args(name: str, args: list[str], part: str) -> dict:
    if name == "interval" and len(args) == 1:  # LO-HI (noise levels are >= 0)
        lo, sep, hi = args[0].partition("-")
        args = [lo, hi] if sep else args
    names, defaults = RULES[name][1], RULES[name][2]
    if len(args) > len(names):
        raise SelfNPOError(
            f"setting {part!r}: {name} takes at most {len(names)} arguments ({', '.join(names)})"
        )
    values = _floats(args, part) + list(defaults[len(args) :])
    out = dict(zip(names, values, strict=True))
    if name == "interval" and not out["t_lo"] < out["t_hi"]:
        raise SelfNPOError(f"setting {part!r}: the interval needs LO < HI")
    if name == "cfg_zero_star" and (out["zero_init_steps"] < 0 or out["zero_init_steps"] % 1):
        raise SelfNPOError(f"setting {part!r}: zero-init steps must be a whole number >= 0")
    return out


def _offset_part(name: str, args: list[str], part: str) -> dict:
    if not args or not args[0]:
        what = "a weak model folder" if name == "autoguidance" else "an offset file or folder"
        raise SelfNPOError(f"setting {part!r}: {name} needs {what}, e.g. {name}:PATH")
    if name == "autoguidance":
        if len(args) > 1:
            raise SelfNPOError(f"setting {part!r}: autoguidance takes one argument (the weak model)")
        return dict(negative=name, offset=args[0])
    if len(args) > 2:
        raise SelfNPOError(f"setting {part!r}: {name} takes OFFSET[:BETA]")
    beta = _floats(args[1:], part)[0] if len(args) > 1 else 1.0
    return dict(negative=name, offset=args[0], beta=beta)


def parse_setting(text: str) -> Setting:
    """One ``[LABEL=]PART[+PART]`` string -> :class:`Setting` (one-line errors)."""
    label, _, spec = text.strip().partition("=") if "=" in text else ("", "", text.strip())
    if not spec:
        raise SelfNPOError(f"empty setting {text!r}")
    kw: dict = {}
    for part in spec.split("+"):
        name, *args = part.strip().split(":")
        if name in RULES:
            if "rule" in kw:
                raise SelfNPOError(f"setting {text!r}: more than one guidance rule")
            kw.update(rule=name, rule_args=_rule_args(name, args, part))
        elif name in NEGATIVES[1:]:
            if "negative" in kw:
                raise SelfNPOError(f"setting {text!r}: more than one negative branch")
            kw.update(dict(negative=name) if name == "negative_prompt" else _offset_part(name, args, part))
            if name == "negative_prompt" and args:
                raise SelfNPOError(f"setting {part!r}: the text comes from --negative-prompt")
        elif name == "pag":
            scale = _floats(args, part) if args else [3.0]
            if len(scale) != 1 or scale[0] <= 0:
                raise SelfNPOError(f"setting {part!r}: pag takes one positive scale")
            kw["pag_scale"] = scale[0]
        else:
            known = ", ".join([*RULES, *NEGATIVES[1:], "pag"])
            raise SelfNPOError(f"setting {text!r}: unknown part {name!r} (known: {known})")
    if kw.get("pag_scale") and len(kw) > 1:
        raise SelfNPOError(f"setting {text!r}: pag runs alone (diffusers' PAG pipeline takes no hook)")
    return check(Setting(label=label.strip() or default_label(spec), **kw))


def default_label(spec: str) -> str:
    """The spec without paths: ``self_npo:runs/x/offset:1+apg`` -> ``self_npo:1+apg``."""
    parts = []
    for part in spec.split("+"):
        name, *args = part.strip().split(":")
        if name in (*OFFSET_KINDS, "autoguidance"):
            args = args[1:]
        parts.append(":".join([name, *args]))
    return "+".join(parts)


def check(s: Setting) -> Setting:
    """Validate a setting built from a string or a JSON object."""
    if s.rule not in RULES:
        raise SelfNPOError(f"setting {s.label!r}: unknown rule {s.rule!r} (known: {', '.join(RULES)})")
    if s.negative not in NEGATIVES:
        raise SelfNPOError(
            f"setting {s.label!r}: unknown negative {s.negative!r} (known: {', '.join(NEGATIVES)})"
        )
    if (s.negative in (*OFFSET_KINDS, "autoguidance")) != bool(s.offset):
        raise SelfNPOError(f"setting {s.label!r}: an offset (or weak model) goes with {s.negative!r} only")
    if not -10 <= s.beta <= 10:
        raise SelfNPOError(f"setting {s.label!r}: beta must be in [-10, 10]")
    if s.pag_scale < 0 or (s.pag_scale and (s.rule != "cfg" or s.negative != "none")):
        raise SelfNPOError(f"setting {s.label!r}: pag takes a positive scale and runs alone")
    unknown = set(s.rule_args) - set(RULES[s.rule][1])
    if unknown:
        raise SelfNPOError(f"setting {s.label!r}: {s.rule} has no argument {', '.join(sorted(unknown))}")
    names, defaults = RULES[s.rule][1], RULES[s.rule][2]
    full = {n: s.rule_args.get(n, d) for n, d in zip(names, defaults, strict=True)}
    if full != s.rule_args:
        return Setting(**{**{f.name: getattr(s, f.name) for f in fields(s)}, "rule_args": full})
    return s


def _from_json(path: Path) -> list[Setting]:
    try:
        items = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise SelfNPOError(f"{path}: unreadable settings file ({type(e).__name__})") from None
    if not isinstance(items, list):
        raise SelfNPOError(f"{path}: expected a JSON list of settings")
    out = []
    allowed = {f.name for f in fields(Setting)}
    for i, item in enumerate(items):
        if isinstance(item, str):
            out.append(parse_setting(item))
            continue
        if not isinstance(item, dict) or not item.get("label") or set(item) - allowed:
            raise SelfNPOError(
                f"{path}: setting {i} must be a string or an object with a label and fields from "
                f"{', '.join(sorted(allowed))}"
            )
        try:
            out.append(check(Setting(**item)))
        except TypeError as e:
            raise SelfNPOError(f"{path}: setting {i}: {e}") from None
    return out


def parse_settings(text: str) -> list[Setting]:
    """``--settings``: comma-separated setting strings, or a ``.json`` file. Labels must be unique."""
    text = text.strip()
    if text.endswith(".json"):
        settings = _from_json(Path(text))
    else:
        settings = [parse_setting(t) for t in text.split(",") if t.strip()]
    if not settings:
        raise SelfNPOError("--settings lists no settings")
    labels = [s.label for s in settings]
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise SelfNPOError(f"--settings: label {dup[0]!r} appears twice; name them LABEL=SETTING")
    return settings


def slug(label: str) -> str:
    """A folder name for a setting: the label's safe characters and a hash of the label (which
    keeps two labels that sanitise alike apart)."""
    import hashlib

    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in label)[:60]
    return f"{safe}-{hashlib.sha1(label.encode()).hexdigest()[:6]}"
