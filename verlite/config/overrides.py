"""Command-line overrides in Hydra's grammar, parsed by hydra-core's own parser.

`key=value`, `+key=value`, `++key=value`, `~key`, `key=null`, `[a,b]`, quoted strings and
`${...}` interpolations mean what they mean to Hydra. One difference, on purpose: a plain
`key=value` may name a key the YAML does not hold (verlite's schema knows every key and its
default, so there is nothing to "append"). Config-group choices (`engine=fsdp`) are
returned separately; the caller composes groups before applying the rest.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from verlite.errors import VerliteError


@dataclass
class Overrides:
    groups: dict[str, str] = field(default_factory=dict)  # group -> choice
    edits: list[tuple[str, str, Any]] = field(default_factory=list)  # (op "set"|"del", key, value)


def parse(items: list[str], group_names: set[str]) -> Overrides:
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    out = Overrides()
    for item in items:
        if "=" not in item and not item.startswith("~"):
            raise VerliteError(f"override '{item}' must look like section.key=value (e.g. data.max_length=512)")
        try:
            (ov,) = parser.parse_overrides([item])
        except HydraException as e:
            ov = _as_plain_string(parser, item)
            if ov is None:
                first = next((line.strip() for line in str(e).splitlines() if line.strip()), "parse error")
                raise VerliteError(f"override '{item}' is not valid Hydra syntax: {first}") from None
        if ov.is_sweep_override():
            raise VerliteError(f"override '{item}' is a sweep (several values); give one value per key")
        key = ov.key_or_group
        if ov.package:
            raise VerliteError(f"override '{item}': the @package form is not supported; write the full key")
        if ov.is_delete():
            out.edits.append(("del", key, None))
            continue
        value = ov.value()
        if key in group_names and "." not in key and isinstance(value, str):
            out.groups[key] = value
            continue
        out.edits.append(("set", key, value))
    return out


def apply(cfg, edits: list[tuple[str, str, Any]]) -> None:
    """Apply parsed edits to an OmegaConf DictConfig in order."""
    from omegaconf import OmegaConf

    for op, key, value in edits:
        if op == "del":
            parent_key, _, leaf = key.rpartition(".")
            parent = OmegaConf.select(cfg, parent_key) if parent_key else cfg
            if parent is not None and OmegaConf.is_dict(parent) and leaf in parent:
                del parent[leaf]  # back to the schema's default
            continue
        OmegaConf.update(cfg, key, value, merge=True, force_add=True)


def _as_plain_string(parser, item: str):
    """A value Hydra's lexer refuses only for a character such as `~` (data.train_files=~/x.json)
    is taken as the plain string it obviously is, as verlite always read it; lists, dicts and
    quoted values keep Hydra's rules."""
    from hydra.errors import HydraException

    key, _, value = item.partition("=")
    if not value or value[0] in "[{'\"" or "'" in value or "${" in value:
        return None
    try:
        (ov,) = parser.parse_overrides([f"{key}='{value}'"])
    except HydraException:
        return None
    return ov
