"""Tenants, members and roles, API keys, per-tenant keys, quotas, usage metering."""
