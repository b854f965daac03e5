-- Every statement pgoutbox runs at run time. One block per query: a `-- name:` line, then a
-- one-line description. {s} is the quoted schema; :name is a parameter (pgoutbox.sql turns it
-- into $n for asyncpg). Casts are written CAST(x AS t): `:x::t` is not a bind to SQLAlchemy.

-- name: operations_publish
-- Insert one operation (its audit row is written by trigger) and wake the channel's workers.
WITH inserted AS (
    INSERT INTO {s}.operations
        (operation_type, channel, payload, run_at, idempotency_key, priority, max_attempts,
         created_by)
    VALUES (:operation_type, :channel, CAST(:payload AS jsonb),
            coalesce(CAST(:run_at AS timestamptz), now()), :idempotency_key, :priority,
            :max_attempts, coalesce(:created_by, current_user))
    ON CONFLICT (idempotency_key) DO NOTHING
    RETURNING id
)
SELECT id, pg_notify(:channel, id::text) FROM inserted;

-- name: operations_publish_many
-- Insert a batch in input order; rows whose idempotency key exists already are skipped.
WITH inserted AS (
    INSERT INTO {s}.operations
        (operation_type, channel, payload, run_at, idempotency_key, priority, max_attempts,
         created_by)
    SELECT operation_type, channel, CAST(payload AS jsonb), coalesce(run_at, now()),
           idempotency_key, priority, max_attempts, coalesce(:created_by, current_user)
    FROM unnest(CAST(:operation_types AS text[]), CAST(:channels AS text[]),
                CAST(:payloads AS text[]), CAST(:run_ats AS timestamptz[]),
                CAST(:idempotency_keys AS text[]), CAST(:priorities AS integer[]),
                CAST(:max_attempts AS integer[]))
         WITH ORDINALITY AS batch(operation_type, channel, payload, run_at, idempotency_key,
                                  priority, max_attempts, position)
    ORDER BY position
    ON CONFLICT (idempotency_key) DO NOTHING
    RETURNING id, channel, idempotency_key
), woken AS (
    -- One wake-up per channel, carrying its first id: workers claim in batches anyway.
    SELECT channel, pg_notify(channel, min(id)::text) FROM inserted GROUP BY channel
)
-- Referencing `woken` makes PostgreSQL run it (an unreferenced SELECT CTE is skipped). Ids are
-- assigned in insertion order, so sorting them gives the input order of the inserted rows.
SELECT id, idempotency_key FROM inserted WHERE (SELECT count(*) FROM woken) >= 0 ORDER BY id;

-- name: operations_match_idempotency_keys
-- For each key given, the existing operation and whether it records the same intent.
SELECT o.id, o.idempotency_key,
       (o.operation_type = given.operation_type AND o.channel = given.channel
        AND o.payload = CAST(given.payload AS jsonb)) AS same_intent
FROM unnest(CAST(:idempotency_keys AS text[]), CAST(:operation_types AS text[]),
            CAST(:channels AS text[]), CAST(:payloads AS text[]))
     AS given(idempotency_key, operation_type, channel, payload)
JOIN {s}.operations o ON o.idempotency_key = given.idempotency_key;

-- name: operations_claim_batch
-- Lock due operations of this channel and these types, oldest first, and lease them.
-- MATERIALIZED: the planner must not fold the CTE into the UPDATE, or the LIMIT and the
-- SKIP LOCKED row locks would no longer be applied once, before the update.
WITH due AS MATERIALIZED (
    SELECT id
    FROM {s}.operations
    WHERE state IN ('pending', 'failed')
      AND channel = :channel
      AND run_at <= now()
      AND operation_type = ANY(CAST(:operation_types AS text[]))
    ORDER BY priority DESC, run_at, id
    LIMIT :batch_size
    FOR UPDATE SKIP LOCKED
)
UPDATE {s}.operations o
SET state = 'claimed', transition = 'claim', transition_actor = :worker_id,
    attempts = o.attempts + 1, version = o.version + 1,
    lease_owner = :worker_id,
    lease_expires_at = now() + make_interval(secs => :lease_seconds)
FROM due
WHERE o.id = due.id
RETURNING o.id, o.operation_type, o.payload, o.attempts, o.max_attempts, o.version,
          o.idempotency_key;

-- name: operations_record_success
-- Fenced: only the attempt that still holds the lease (same version) can succeed.
UPDATE {s}.operations o
SET state = 'succeeded', transition = 'succeed', transition_actor = :worker_id,
    version = o.version + 1, lease_owner = NULL, lease_expires_at = NULL
FROM unnest(CAST(:ids AS bigint[]), CAST(:versions AS bigint[])) AS done(id, version)
WHERE o.id = done.id AND o.version = done.version AND o.state = 'claimed'
RETURNING o.id;

-- name: operations_record_failure
-- Fenced like success. Retries wait base * 2^(attempt-1) seconds (capped), with jitter, in
-- database time; attempts exhausted or a non-retryable error give up.
UPDATE {s}.operations o
SET state = CASE WHEN f.give_up OR o.attempts >= f.max_attempts THEN 'dead' ELSE 'failed' END,
    transition = CASE WHEN f.give_up OR o.attempts >= f.max_attempts THEN 'give_up' ELSE 'fail' END,
    transition_actor = :worker_id,
    transition_detail = f.detail,
    last_error = f.error,
    version = o.version + 1, lease_owner = NULL, lease_expires_at = NULL,
    run_at = CASE WHEN f.give_up OR o.attempts >= f.max_attempts THEN o.run_at
             ELSE now() + make_interval(secs => least(f.backoff_max,
                      f.backoff_base * power(2, o.attempts - 1))
                      * (1 - f.jitter * random())) END
FROM unnest(CAST(:ids AS bigint[]), CAST(:versions AS bigint[]), CAST(:errors AS text[]),
            CAST(:details AS text[]), CAST(:give_ups AS boolean[]),
            CAST(:max_attempts AS integer[]), CAST(:backoff_bases AS float8[]),
            CAST(:backoff_maxes AS float8[]), CAST(:jitters AS float8[]))
     AS f(id, version, error, detail, give_up, max_attempts, backoff_base, backoff_max, jitter)
WHERE o.id = f.id AND o.version = f.version AND o.state = 'claimed'
RETURNING o.id, o.state;

-- name: operations_record_rejected
-- Audit a result that arrived after its lease was lost (no state change: the newer attempt
-- owns the outcome).
UPDATE {s}.operations o
SET transition = 'reject', transition_actor = :worker_id, transition_detail = r.detail
FROM unnest(CAST(:ids AS bigint[]), CAST(:details AS text[])) AS r(id, detail)
WHERE o.id = r.id;

-- name: operations_extend_leases
-- Heartbeat: push the lease of what this worker still holds; returns the ids still held.
UPDATE {s}.operations o
SET lease_expires_at = now() + make_interval(secs => :lease_seconds)
FROM unnest(CAST(:ids AS bigint[]), CAST(:versions AS bigint[])) AS held(id, version)
WHERE o.id = held.id AND o.version = held.version AND o.state = 'claimed'
  AND o.lease_owner = :worker_id
RETURNING o.id;

-- name: operations_rescue_expired
-- Move operations whose lease expired (their worker died or stalled) to failed or dead, per
-- the handler's on_lost policy. Fenced by the row lock: a worker recording at the same moment
-- either wins (state is no longer claimed) or finds the version changed.
WITH expired AS MATERIALIZED (
    SELECT o.id, p.on_lost_dead, p.max_attempts
    FROM {s}.operations o
    JOIN unnest(CAST(:operation_types AS text[]), CAST(:on_lost_dead AS boolean[]),
                CAST(:max_attempts AS integer[])) AS p(operation_type, on_lost_dead, max_attempts)
      ON p.operation_type = o.operation_type
    WHERE o.state = 'claimed' AND o.lease_expires_at < now() AND o.channel = :channel
    ORDER BY o.lease_expires_at
    LIMIT :limit
    FOR UPDATE OF o SKIP LOCKED
)
UPDATE {s}.operations o
SET state = CASE WHEN e.on_lost_dead OR o.attempts >= coalesce(o.max_attempts, e.max_attempts)
                 THEN 'dead' ELSE 'failed' END,
    transition = 'lose', transition_actor = :worker_id,
    transition_detail = 'lease of ' || coalesce(o.lease_owner, '?') || ' expired at '
        || o.lease_expires_at::text
        || CASE WHEN e.on_lost_dead THEN '; on_lost=dead: the handler may have run, not retried'
                ELSE '' END,
    last_error = 'lease expired: worker ' || coalesce(o.lease_owner, '?') || ' was lost',
    version = o.version + 1, lease_owner = NULL, lease_expires_at = NULL, run_at = now()
FROM expired e
WHERE o.id = e.id
RETURNING o.id, o.state;

-- name: operations_release
-- Graceful stop: hand back operations whose handler did not finish in time.
UPDATE {s}.operations o
SET state = CASE WHEN r.on_lost_dead THEN 'dead' ELSE 'pending' END,
    transition = CASE WHEN r.on_lost_dead THEN 'lose' ELSE 'release' END,
    transition_actor = :worker_id,
    transition_detail = 'worker stopped before the handler finished',
    last_error = CASE WHEN r.on_lost_dead THEN 'worker stopped mid-handler (on_lost=dead)'
                 ELSE o.last_error END,
    version = o.version + 1, lease_owner = NULL, lease_expires_at = NULL
FROM unnest(CAST(:ids AS bigint[]), CAST(:versions AS bigint[]), CAST(:on_lost_dead AS boolean[]))
     AS r(id, version, on_lost_dead)
WHERE o.id = r.id AND o.version = r.version AND o.state = 'claimed'
RETURNING o.id;

-- name: operations_next_run_at
-- When the next operation this worker could claim becomes due (NULL: none waiting).
SELECT min(run_at) - now() AS wait
FROM {s}.operations
WHERE state IN ('pending', 'failed') AND channel = :channel
  AND operation_type = ANY(CAST(:operation_types AS text[]));

-- name: workers_register
-- Announce a live worker (operators see it in `pgoutbox workers`).
INSERT INTO {s}.workers (id, hostname, pid, channel, operation_types)
VALUES (:worker_id, :hostname, :pid, :channel, CAST(:operation_types AS text[]))
ON CONFLICT (id) DO UPDATE SET heartbeat_at = now();

-- name: workers_heartbeat
-- Mark a worker alive.
UPDATE {s}.workers SET heartbeat_at = now() WHERE id = :worker_id;

-- name: workers_unregister
-- Remove a worker that stopped.
DELETE FROM {s}.workers WHERE id = :worker_id;

-- name: audit_log_page
-- The audit chains in (operation_id, seq) order, after a keyset position, with each
-- operation's recorded chain head.
SELECT a.operation_id, a.seq, a.operation_type, a.from_state, a.to_state, a.trigger, a.attempt,
       a.actor, a.detail, a.recorded_at, a.prev_hash, a.hash,
       o.id IS NOT NULL AS operation_exists, o.audit_seq AS head_seq, o.audit_hash AS head_hash,
       o.state AS current_state
FROM {s}.audit_log a
LEFT JOIN {s}.operations o ON o.id = a.operation_id
WHERE (a.operation_id, a.seq) > (:after_operation_id, :after_seq)
ORDER BY a.operation_id, a.seq
LIMIT :limit;

-- name: operations_without_audit
-- Operations whose chain has no first row at all.
SELECT o.id FROM {s}.operations o
WHERE NOT EXISTS (SELECT 1 FROM {s}.audit_log a WHERE a.operation_id = o.id AND a.seq = 1)
ORDER BY o.id
LIMIT 1;

-- name: audit_log_count
-- How many audit rows there are (for progress reporting).
SELECT count(*) FROM {s}.audit_log;
