"""Attacks that measure what still leaks, run against exactly what an adversary would see."""

from fedcare.audit.gradient import GradientAuditResult, audit_gradient_leakage

__all__ = ["GradientAuditResult", "audit_gradient_leakage"]
