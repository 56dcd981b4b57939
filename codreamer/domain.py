"""Domain models of the outreach task: who we write to, what we sell, what happened.

These are pydantic models so that every file we load is validated field by field and a
bad record is reported with its file, line and field instead of failing deep in a rollout.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Persona = Literal[
    "analytical",  # wants numbers and evidence
    "busy_executive",  # wants the point in two lines
    "technical",  # wants specifics on how it works
    "skeptical",  # has been burned by vendors before
    "relationship",  # responds to warmth and shared context
]

Split = Literal["train", "heldout"]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Company(_Frozen):
    """Facts about the prospect's company that the agent may look up and cite."""

    name: str = Field(min_length=1)
    industry: str = Field(min_length=1)
    employees: int = Field(gt=0)
    headquarters: str = Field(min_length=1)
    recent_news: str = Field(min_length=1, description="A real trigger event worth referencing.")
    tech_stack: list[str] = Field(default_factory=list)


class Prospect(_Frozen):
    """A person we may email. `prospect_id` is stable across files, runs and outcomes."""

    prospect_id: str = Field(pattern=r"^p[0-9]{3}$")
    first_name: str = Field(min_length=1)
    last_name: str = Field(min_length=1)
    email: str = Field(pattern=r"^[^@\s]+@[^@\s]+\.[a-z]{2,}$")
    title: str = Field(min_length=1)
    seniority: Literal["individual_contributor", "manager", "director", "vp", "c_level"]
    persona: Persona
    pain_points: list[str] = Field(min_length=1)
    company: Company

    @property
    def full_name(self) -> str:
        return f"{self.first_name} {self.last_name}"


class Product(_Frozen):
    """What the outreach agent sells; the rubric checks that the email stays on it."""

    name: str
    one_liner: str
    value_props: list[str] = Field(min_length=1)
    call_to_action: str
    sender_name: str
    sender_title: str


class Scenario(_Frozen):
    """One training or evaluation task: write a first outreach email to one prospect."""

    scenario_id: str
    split: Split
    prospect: Prospect


class Email(_Frozen):
    """The agent's final answer."""

    subject: str
    body: str
