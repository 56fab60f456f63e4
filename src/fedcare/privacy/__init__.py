"""Differential privacy: noise, clipping, DP-SGD, client-level DP, accounting, the ledger."""
