"""[0] Bad input in one line: keys the typed schema does not know, keys removed with `~`, and the
errors Hydra and OmegaConf raise while composing (wrong types, broken interpolations, missing
group options, override syntax), each turned into one line that says what is wrong and the fix.

Hydra's struct mode already rejects `selector.kep=0.2`, but `+selector.kep=0.2` adds the key and
OmegaConf.to_object ignores it, so a typo would start a full run that silently drops it. Fields
typed as a free dict (`model.chat_template_kwargs`) take any key. The functions return messages;
config.validate and the CLI raise or print them. This module imports nothing from tipdistill.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import typing
from typing import Any, Iterable, Optional

DOCS = "https://hydra.cc/docs/1.2/advanced/override_grammar/basic"


def _section(annotation: Any) -> Optional[type]:
    """The dataclass a field holds, also through Optional[...]; None for leaves and free dicts."""
    for t in (annotation, *typing.get_args(annotation)):
        if dataclasses.is_dataclass(t):
            return t  # type: ignore[return-value]
    return None


def _fields(schema: type) -> dict[str, Any]:
    hints = typing.get_type_hints(schema)
    return {f.name: hints[f.name] for f in dataclasses.fields(schema)}


def schema_keys(schema: type, prefix: str = "") -> dict[str, Any]:
    """Every dotted key of the schema -> its type annotation, sections included, in schema order."""
    out: dict[str, Any] = {}
    for name, annotation in _fields(schema).items():
        out[prefix + name] = annotation
        sub = _section(annotation)
        if sub is not None:
            out.update(schema_keys(sub, f"{prefix}{name}."))
    return out


def nearest_key(key: str, known: Iterable[str]) -> str:
    """The known key most like `key`: its last part weighs as much as the whole path, so both a typo
    in the right section (`optim.lrr`) and a right name in the wrong section (`selector.kep`) match."""
    leaf = key.rsplit(".", 1)[-1]

    def similarity(candidate: str) -> float:
        return (difflib.SequenceMatcher(None, leaf, candidate.rsplit(".", 1)[-1]).ratio()
                + difflib.SequenceMatcher(None, key, candidate).ratio())

    return max(known, key=similarity)


def unknown_key(key: str, schema: type) -> str:
    near = nearest_key(key, schema_keys(schema))
    return (f"unknown config key '{key}'; the nearest known key is '{near}'; fix: correct or drop it "
            "(`tipdistill train --cfg job` prints every key)")


def removed_key(key: str, schema: type, groups: Iterable[str] = (), typed: Optional[str] = None) -> str:
    """`typed`: the override as written (default `~key`)."""
    typed = typed or f"~{key}"
    annotation = schema_keys(schema)[key]
    if key in set(groups):
        how = f"pick an option instead ({key}=<name>; `tipdistill train --help` lists them)"
    elif type(None) in typing.get_args(annotation):
        how = f"set {key}=null to unset it"
    elif _section(annotation) is not None:
        how = f"set single keys instead ({key}.<key>=<value>)"
    else:
        how = f"set {key}=<value> instead"
    return f"{typed} removes '{key}', which every run needs; fix: drop {typed} and {how}"


def _removal(overrides: Iterable[str], schema: type, groups: Iterable[str]) -> Optional[str]:
    keys, groups = schema_keys(schema), set(groups)
    for override in overrides:
        key, _, value = override.lstrip("+").partition("=")
        if override.startswith("~") and override[1:].split("=", 1)[0] in keys:
            return removed_key(override[1:].split("=", 1)[0], schema, groups)
        if key in groups and value.replace(" ", "") == "[]":  # an empty option list removes the group too
            return removed_key(key, schema, groups, typed=override)
    return None


def check_keys(cfg: Any, schema: type, overrides: Iterable[str] = (), groups: Iterable[str] = ()) -> Optional[str]:
    """The first unknown or removed key of a composed config, as one line; None when every key is known.

    `overrides` (as typed) tell a removed config group (`~selector`) apart: after it the schema's
    defaults fill the section again, so the composed config alone cannot show it. `groups` are the
    config group names (conf/<group>/), for the fix part of the message."""
    from omegaconf import OmegaConf

    removal = _removal(overrides, schema, groups)
    if removal is not None:
        return removal
    plain = OmegaConf.to_container(cfg, resolve=False)
    plain.pop("hydra", None)  # present when composed with return_hydra_config
    return _check_node(plain, schema, "", schema, set(groups))


def _check_node(node: dict, section: type, prefix: str, schema: type, groups: set[str]) -> Optional[str]:
    fields = _fields(section)
    for key in node:
        if key not in fields:
            path, value = f"{prefix}{key}", node[key]
            while isinstance(value, dict) and len(value) == 1:  # `+loger.mode=x` made {loger: {mode: x}}: name all of it
                (child, value), = value.items()
                path += f".{child}"
            return unknown_key(path, schema)
    for name, annotation in fields.items():
        if name not in node:
            return removed_key(prefix + name, schema, groups)
        sub = _section(annotation)
        if sub is not None and isinstance(node[name], dict):
            found = _check_node(node[name], sub, f"{prefix}{name}.", schema, groups)
            if found is not None:
                return found
    return None


def non_finite(typed: Any, prefix: str = "") -> Optional[str]:
    """The first float of a typed config that is nan or +-inf: range checks written as `x > 0` let
    inf through (optim.lr=inf, optim.weight_decay=inf), and nan fails them with a confusing message."""
    for f in dataclasses.fields(typed):
        value = getattr(typed, f.name)
        if dataclasses.is_dataclass(value):
            found = non_finite(value, f"{prefix}{f.name}.")
            if found is not None:
                return found
        if isinstance(value, float) and not math.isfinite(value):
            return f"{prefix}{f.name} must be a finite number, got {value}; fix: set {prefix}{f.name}=<a number>"
    return None


# ---------------------------------------------------------------- Hydra / OmegaConf errors


def _lines(text: str) -> list[str]:
    """The message lines worth showing: no blanks, no OmegaConf node dumps, no search-path listing."""
    out = []
    for line in str(text).splitlines():
        line = line.strip()
        if line.startswith(("Config search path", "Search path", "provider=")):
            break
        if line and not line.startswith(("full_key:", "object_type=", "reference_type=", "See https://hydra.cc")):
            out.append(line)
    return out


def _kind(annotation: Any) -> str:
    """A field type in words, for the fix part of a message."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    nullable = " or null" if type(None) in typing.get_args(annotation) else ""
    base = args[0] if nullable and len(args) == 1 else annotation
    origin = typing.get_origin(base)
    if origin is list:
        (item,) = typing.get_args(base) or (Any,)
        return f"a list of {_kind(item).removeprefix('a ').removeprefix('an ')}s ([a,b]){nullable}"
    if origin is dict:
        return "a mapping ({key: value})" + nullable
    words = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    return words.get(base, getattr(base, "__name__", str(base))) + nullable


def _omegaconf_cause(exc: BaseException):
    from omegaconf.errors import OmegaConfBaseException

    seen = exc
    while seen is not None:
        if isinstance(seen, OmegaConfBaseException):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _raised_in(exc: BaseException, packages: tuple[str, ...]) -> bool:
    tb = exc.__traceback__
    last = None
    while tb is not None:
        last = tb.tb_frame.f_globals.get("__name__", "")
        tb = tb.tb_next
    return bool(last) and last.split(".")[0] in packages


def _group_without_option(overrides: list[str], groups: Iterable[str]) -> str:
    """Hydra's words for `optim=null` or `=1` name neither the override nor the fix."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    for override in overrides:
        try:
            parsed = OverridesParser.create().parse_overrides([override])[0]
        except Exception:  # noqa: BLE001 - a malformed one is reported by its own error
            continue
        key = parsed.key_or_group
        if not key:
            return f"'{override}' has no key; fix: write key=value"
        if (key in set(groups) or key == "hydra") and not isinstance(parsed.value(), (str, list)):
            return f"'{override}': the config group {key} takes an option name; fix: {key}=<name> (`tipdistill train --help` lists them)"
    return "a config group override has no option name; fix: group=<name>"


def describe(exc: BaseException, schema: type, overrides: Iterable[str] = (), groups: Iterable[str] = ()) -> Optional[str]:
    """One line for an error Hydra or OmegaConf raised on bad input; None for anything else (a bug)."""
    from hydra.errors import HydraException, MissingConfigException, OverrideParseException
    from omegaconf.errors import (ConfigAttributeError, ConfigKeyError, GrammarParseError, InterpolationResolutionError,
                                  OmegaConfBaseException, ValidationError)

    overrides = list(overrides)
    keys = schema_keys(schema)
    cause = _omegaconf_cause(exc)
    if not isinstance(exc, (HydraException, OmegaConfBaseException)) and not _raised_in(exc, ("hydra", "omegaconf")):
        return None
    if isinstance(exc, OverrideParseException):
        detail = "; ".join(line for line in _lines(exc.message) if not line.startswith("Error parsing override"))
        return (f"cannot parse the override '{exc.override}': {detail}; fix: write key=value and quote values with "
                f"special characters (key='a b'), see {DOCS}")
    if isinstance(exc, MissingConfigException) and exc.missing_cfg_file and "/" in exc.missing_cfg_file:
        group, option = exc.missing_cfg_file.rsplit("/", 1)
        options = ", ".join(exc.options or [])
        return f"no option '{option}' in config group '{group}'; valid: {options} (set {group}=<one of them>)"
    removal = _removal(overrides, schema, groups)
    if removal is not None:
        return removal
    if isinstance(exc, ValueError) and str(exc).startswith("Config group override must be"):
        return _group_without_option(overrides, groups)
    if "No match in the defaults list" in str(exc) and str(exc).startswith("Could not delete '"):
        name = str(exc).split("'")[1]
        return f"'~{name}' deletes nothing: no key or config group is called '{name}'; fix: drop it or name an existing key"
    added = re.match(r"(\S+) appears more than once in the final defaults list|Multiple values for (\S+?)\.", str(exc))
    if added:  # `+selector=full`: a group already in the defaults list is chosen without `+`
        group = added.group(1) or added.group(2)
        typed = next((o for o in overrides if o.startswith(f"+{group}=") or o.startswith(f"++{group}=")), f"+{group}=...")
        return f"'{typed}' adds a second {group}, but the config has one already; fix: choose it with {typed.lstrip('+')} (no +)"
    if isinstance(exc, AssertionError) and str(exc).startswith("Unexpected type"):
        null = sorted(k for k, a in keys.items() if _section(a) is not None and type(None) in typing.get_args(a))
        culprits = [o.lstrip("+") for o in overrides if any(o.lstrip("+").startswith(n + ".") for n in null)]
        where = culprits[0].split("=", 1)[0] if culprits else "a key"
        section = next((n for n in null if where.startswith(n + ".")), "its section")
        return (f"{where} is set, but {section} is null in this config (e.g. a hub pair has no embedded models); "
                f"fix: drop the override, or choose a config where {section} exists")
    if isinstance(cause, (ConfigKeyError, ConfigAttributeError)) and cause.full_key and "not in" in str(cause):
        return unknown_key(cause.full_key, schema)
    first = _lines(str(exc))
    override = first[0].removeprefix("Error merging override ").strip() if first and first[0].startswith("Error merging override") else None
    if isinstance(cause, ValidationError) and not isinstance(cause, InterpolationResolutionError) and cause.full_key:
        key = re.sub(r"\[\d+\]$", "", cause.full_key)  # task.digits[0] -> task.digits
        what = "; ".join(_lines(cause.msg or str(cause)))
        need = f"; fix: {key} takes {_kind(keys[key])}" if key in keys else ""
        return f"{override or key}: {what}{need}"
    if isinstance(cause, (InterpolationResolutionError, GrammarParseError)):
        key = cause.full_key or (override or "?").split("=", 1)[0]
        what = "; ".join(_lines(cause.msg or str(cause)))
        return (f"{override or key}: cannot resolve the interpolation ({what}); fix: point ${{...}} at an existing key "
                "or give a default, e.g. ${oc.env:NAME,default}")
    text = "; ".join(_lines(str(exc)))
    if cause is not None and cause is not exc:
        text += "; " + "; ".join(_lines(cause.msg or str(cause)))
    return text.replace("In 'train': ", "") if text else type(exc).__name__
