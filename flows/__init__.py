"""Orchestration: the Prefect flows, the per-row steps and the s2v-batch command line."""

import os

# Prefect's ephemeral API server (used when no PREFECT_API_URL is set) would send usage
# telemetry to Prefect's servers; batches often run where that is unwanted or unreachable.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
