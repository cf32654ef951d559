"""The condition language of routing rules: small, declarative, checked on load, never eval'd.

A condition is a YAML mapping whose key says what it tests:
  all / any / not                      nesting
  tag: Keyword + one operator          equals, in, regex (+ ignore_case), gt, ge, lt, le, range, present
  calling_ae / called_ae: {operator}   equals, in, regex (+ ignore_case)
  peer: address or network (CIDR)
  orientation: axial | coronal | sagittal | oblique (or a list)
Each test answers (passed, reason) so that `route explain` can say which condition decided.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator, model_validator
from pydicom.datadict import dictionary_VR, tag_for_keyword

from node.route.study import PSEUDO_TAGS, ROUTABLE, SeriesView, StudyView

NUMERIC_VRS = {"IS", "DS", "US", "UL", "SS", "SL", "FL", "FD"}
Orientation = Literal["axial", "coronal", "sagittal", "oblique"]


@dataclass(frozen=True)
class Context:
    study: StudyView
    series: SeriesView


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class _Match(_Strict):
    """equals / in / regex on a text value (shared by tag and AE tests)."""

    equals: Any = None
    in_: list[Any] | None = Field(None, alias="in")
    regex: str | None = None
    ignore_case: bool = False

    @field_validator("regex")
    @classmethod
    def _compiles(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"bad regular expression: {exc}") from None
        return value

    def _text_ops(self) -> list[str]:
        return [name for name in ("equals", "in_", "regex") if getattr(self, name) is not None]

    def _text_test(self, value: Any) -> tuple[bool, str]:
        values = value if isinstance(value, list) else [value]
        shown = "\\".join(str(v) for v in values) if isinstance(value, list) else repr(value)
        if self.equals is not None:
            ok = any(_same(v, self.equals, self.ignore_case) for v in values if v is not None)
            return ok, f"equals {self.equals!r} (is {shown})"
        if self.in_ is not None:
            ok = any(_same(v, item, self.ignore_case) for v in values if v is not None for item in self.in_)
            return ok, f"in {self.in_} (is {shown})"
        flags = re.IGNORECASE if self.ignore_case else 0
        ok = any(re.search(str(self.regex), str(v), flags) is not None for v in values if v is not None)
        return ok, f"matches /{self.regex}/{'i' if self.ignore_case else ''} (is {shown})"


def _same(value: Any, expected: Any, ignore_case: bool) -> bool:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            return float(value) == float(expected)
        except (TypeError, ValueError):
            return False
    a, b = str(value), str(expected)
    return a.lower() == b.lower() if ignore_case else a == b


class TagTest(_Match):
    tag: str
    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None
    range: tuple[float, float] | None = None
    present: bool | None = None

    @field_validator("tag")
    @classmethod
    def _known(cls, keyword: str) -> str:
        if keyword in ROUTABLE:
            return keyword
        if tag_for_keyword(keyword) is None:
            raise ValueError(f"unknown tag keyword {keyword!r}")
        raise ValueError(f"{keyword} is a DICOM keyword but not a routing tag (routing tags: {', '.join(sorted(ROUTABLE))})")

    @model_validator(mode="after")
    def _one_operator(self) -> "TagTest":
        numeric = [n for n in ("gt", "ge", "lt", "le", "range") if getattr(self, n) is not None]
        ops = self._text_ops() + numeric + (["present"] if self.present is not None else [])
        if len(ops) != 1:
            raise ValueError(f"a tag test needs exactly one operator (equals, in, regex, gt, ge, lt, le, range, present), got {ops or 'none'}")
        if numeric and not _is_numeric(self.tag):
            raise ValueError(f"{numeric[0]} needs a numeric tag; {self.tag} is text")
        if self.range is not None and self.range[0] > self.range[1]:
            raise ValueError("range must be [low, high]")
        return self

    def test(self, ctx: Context) -> tuple[bool, str]:
        value = ctx.series.value(self.tag)
        if self.present is not None:
            ok = (value not in (None, "", [])) == self.present
            return ok, f"{self.tag} {'present' if self.present else 'absent'} (is {value!r})"
        if self._text_ops():
            ok, why = self._text_test(value)
            return ok, f"{self.tag} {why}"
        if value is None:
            return False, f"{self.tag} has no value"
        number = float(value)
        checks = {
            "gt": (self.gt, lambda b: number > b), "ge": (self.ge, lambda b: number >= b),
            "lt": (self.lt, lambda b: number < b), "le": (self.le, lambda b: number <= b),
        }
        for name, (bound, check) in checks.items():
            if bound is not None:
                return check(bound), f"{self.tag} {name} {bound:g} (is {number:g})"
        lo, hi = self.range  # type: ignore[misc]
        return lo <= number <= hi, f"{self.tag} in range [{lo:g}, {hi:g}] (is {number:g})"


def _is_numeric(keyword: str) -> bool:
    return keyword in PSEUDO_TAGS or dictionary_VR(keyword) in NUMERIC_VRS


class AeTest(_Strict):
    calling_ae: _Match | None = None
    called_ae: _Match | None = None

    @model_validator(mode="after")
    def _one(self) -> "AeTest":
        which = [k for k in ("calling_ae", "called_ae") if getattr(self, k) is not None]
        if len(which) != 1:
            raise ValueError("use calling_ae or called_ae, one per condition")
        test = getattr(self, which[0])
        if len(test._text_ops()) != 1:
            raise ValueError(f"{which[0]} needs exactly one of equals, in, regex")
        return self

    def test(self, ctx: Context) -> tuple[bool, str]:
        name = "calling_ae" if self.calling_ae is not None else "called_ae"
        matcher: _Match = getattr(self, name)
        ok, why = matcher._text_test(getattr(ctx.study, name))
        return ok, f"{name} {why}"


class PeerTest(_Strict):
    peer: str

    @field_validator("peer")
    @classmethod
    def _network(cls, value: str) -> str:
        try:
            ipaddress.ip_network(value, strict=False)
        except ValueError:
            raise ValueError(f"{value!r} is not an IP address or network") from None
        return value

    def test(self, ctx: Context) -> tuple[bool, str]:
        try:
            ok = ipaddress.ip_address(ctx.study.peer) in ipaddress.ip_network(self.peer, strict=False)
        except ValueError:
            ok = False
        return ok, f"peer in {self.peer} (is {ctx.study.peer or 'unknown'})"


class OrientationTest(_Strict):
    orientation: Orientation | list[Orientation]

    def test(self, ctx: Context) -> tuple[bool, str]:
        wanted = self.orientation if isinstance(self.orientation, list) else [self.orientation]
        actual = ctx.series.orientation
        return actual in wanted, f"orientation {'/'.join(wanted)} (is {actual or 'unknown'})"


class All(_Strict):
    all: list["Condition"] = Field(min_length=1)

    def test(self, ctx: Context) -> tuple[bool, str]:
        for condition in self.all:
            ok, why = condition.test(ctx)
            if not ok:
                return False, why
        return True, " and ".join(c.test(ctx)[1] for c in self.all)


class AnyOf(_Strict):
    any: list["Condition"] = Field(min_length=1)

    def test(self, ctx: Context) -> tuple[bool, str]:
        reasons = []
        for condition in self.any:
            ok, why = condition.test(ctx)
            if ok:
                return True, why
            reasons.append(why)
        return False, "none of: " + "; ".join(reasons)


class Not(_Strict):
    not_: "Condition" = Field(alias="not")

    def test(self, ctx: Context) -> tuple[bool, str]:
        ok, why = self.not_.test(ctx)
        return not ok, f"not ({why})"


_KINDS = {"all": "all", "any": "any", "not": "not", "tag": "tag", "calling_ae": "ae", "called_ae": "ae",
          "peer": "peer", "orientation": "orientation"}


def _kind(value: Any) -> str | None:
    if isinstance(value, dict):
        return next((_KINDS[k] for k in value if k in _KINDS), None)
    return {All: "all", AnyOf: "any", Not: "not", TagTest: "tag", AeTest: "ae", PeerTest: "peer",
            OrientationTest: "orientation"}.get(type(value))


Condition = Annotated[
    Union[
        Annotated[All, Tag("all")], Annotated[AnyOf, Tag("any")], Annotated[Not, Tag("not")],
        Annotated[TagTest, Tag("tag")], Annotated[AeTest, Tag("ae")], Annotated[PeerTest, Tag("peer")],
        Annotated[OrientationTest, Tag("orientation")],
    ],
    Discriminator(_kind, custom_error_type="condition",
                  custom_error_message="a condition needs one of the keys: all, any, not, tag, calling_ae, called_ae, peer, orientation"),
]

All.model_rebuild()
AnyOf.model_rebuild()
Not.model_rebuild()
