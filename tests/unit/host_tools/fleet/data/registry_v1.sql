-- The registry schema as edge-sdk wrote it at schema version 1 (host_tools/fleet/registry.py,
-- migration 1 and the schema_version table), copied verbatim. {id} and {float} are the
-- dialect's identity column and float type. Statements end with a line holding ";".
CREATE TABLE IF NOT EXISTS devices (
    device_id TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    platform TEXT,
    runtimes TEXT,
    agent_version TEXT,
    active_bundle TEXT,
    first_seen {float} NOT NULL,
    last_seen {float} NOT NULL
)
;
CREATE TABLE IF NOT EXISTS deployments (
    id {id},
    device_id TEXT NOT NULL,
    bundle_name TEXT NOT NULL,
    bundle_version TEXT NOT NULL,
    bundle_sha256 TEXT NOT NULL,
    transfer_id TEXT,
    state TEXT NOT NULL,
    error_code TEXT,
    error_message TEXT,
    started_at {float} NOT NULL,
    finished_at {float}
)
;
CREATE INDEX IF NOT EXISTS deployments_device ON deployments (device_id, started_at)
;
CREATE INDEX IF NOT EXISTS deployments_started ON deployments (started_at)
;
CREATE TABLE IF NOT EXISTS metrics (
    id {id},
    device_id TEXT NOT NULL,
    bundle_name TEXT NOT NULL,
    bundle_version TEXT NOT NULL,
    received_at {float} NOT NULL,
    report TEXT NOT NULL
)
;
CREATE INDEX IF NOT EXISTS metrics_device_bundle
    ON metrics (device_id, bundle_name, bundle_version, received_at)
;
CREATE INDEX IF NOT EXISTS metrics_bundle
    ON metrics (bundle_name, bundle_version, received_at)
;
CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY)
;
