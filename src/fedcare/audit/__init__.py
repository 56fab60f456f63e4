"""Attacks that measure what still leaks, run against exactly what an adversary would see."""

from fedcare.audit.canary import (
    CanaryAuditResult,
    OneRunBound,
    audit_canaries,
    epsilon_lower_bound,
    one_run_bound,
)
from fedcare.audit.gradient import GradientAuditResult, audit_gradient_leakage
from fedcare.audit.membership import (
    LiRA,
    MembershipAuditResult,
    MembershipMetrics,
    ThresholdAttack,
    audit_membership,
    membership_metrics,
)

__all__ = [
    "CanaryAuditResult",
    "GradientAuditResult",
    "LiRA",
    "MembershipAuditResult",
    "MembershipMetrics",
    "OneRunBound",
    "ThresholdAttack",
    "audit_canaries",
    "audit_gradient_leakage",
    "audit_membership",
    "epsilon_lower_bound",
    "membership_metrics",
    "one_run_bound",
]
