"""Attacks that measure what still leaks, run against exactly what an adversary would see."""

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
    "GradientAuditResult",
    "LiRA",
    "MembershipAuditResult",
    "MembershipMetrics",
    "ThresholdAttack",
    "audit_gradient_leakage",
    "audit_membership",
    "membership_metrics",
]
