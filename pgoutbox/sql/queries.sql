-- Every statement pgoutbox runs at run time. One block per query: a `-- name:` line, then a
-- one-line description. {s} is the quoted schema; :name is a parameter (pgoutbox.sql turns it
-- into $n for asyncpg). Casts are written CAST(x AS t): `:x::t` is not a bind to SQLAlchemy.
--
-- The worker plans its statements once per connection (a generic plan: pgoutbox.db's
-- HOT_PATH_SETTINGS), which knows neither a LIMIT nor how many ids an array holds. So rows are
-- found the way that is right for any of them (tests/integration/test_generic_plans.py):
-- - rows a CTE picked are updated through `o.id = ANY (ARRAY(SELECT id FROM cte))`, an index
--   lookup per id; a join with the CTE is planned for a tenth of the table (the generic
--   estimate of a LIMIT) and hashed the whole table;
-- - a lease is fenced with `o.lease_owner IS NOT DISTINCT FROM :worker_id` (the worker id is
--   never NULL, so this is `=`): with `=` the planner walks every lease of the worker, which
--   statistics say are few, and compares each with every id given, instead of looking the ids
--   up by primary key.

-- name: operations_publish
-- Insert one operation (its audit row is written by trigger) and wake the channel's workers.
WITH inserted AS (
    INSERT INTO {s}.operations
        (operation_type, channel, payload, run_at, idempotency_key, priority, max_attempts,
         created_by, trace_context, ordering_key)
    VALUES (:operation_type, :channel, CAST(:payload AS jsonb),
            coalesce(CAST(:run_at AS timestamptz), now()), :idempotency_key, :priority,
            :max_attempts, coalesce(:created_by, current_user),
            CAST(:trace_context AS jsonb), :ordering_key)
    ON CONFLICT (idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
    RETURNING id
)
SELECT id, pg_notify(:channel, id::text) FROM inserted;

-- name: operations_publish_many
-- Insert a batch in input order; rows whose idempotency key exists already are skipped. The
-- batch shares one trace context: the publisher's.
WITH inserted AS (
    INSERT INTO {s}.operations
        (operation_type, channel, payload, run_at, idempotency_key, priority, max_attempts,
         created_by, trace_context, ordering_key)
    SELECT operation_type, channel, CAST(payload AS jsonb), coalesce(run_at, now()),
           idempotency_key, priority, max_attempts, coalesce(:created_by, current_user),
           CAST(:trace_context AS jsonb), ordering_key
    FROM unnest(CAST(:operation_types AS text[]), CAST(:channels AS text[]),
                CAST(:payloads AS text[]), CAST(:run_ats AS timestamptz[]),
                CAST(:idempotency_keys AS text[]), CAST(:priorities AS integer[]),
                CAST(:max_attempts AS integer[]), CAST(:ordering_keys AS text[]))
         WITH ORDINALITY AS batch(operation_type, channel, payload, run_at, idempotency_key,
                                  priority, max_attempts, ordering_key, position)
    ORDER BY position
    ON CONFLICT (idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
    RETURNING id, channel, idempotency_key
), woken AS (
    -- One wake-up per channel, carrying its first id: workers claim in batches anyway.
    SELECT channel, pg_notify(channel, min(id)::text) FROM inserted GROUP BY channel
)
-- Referencing `woken` makes PostgreSQL run it (an unreferenced SELECT CTE is skipped). Ids are
-- assigned in insertion order, so sorting them gives the input order of the inserted rows.
SELECT id, idempotency_key FROM inserted WHERE (SELECT count(*) FROM woken) >= 0 ORDER BY id;

-- name: operations_lock_ordering_keys
-- Publishers of one ordering key take turns, until their transactions end: so an operation's
-- id is assigned only after every earlier one of its key has committed (or rolled back), and
-- id order is the order in which a key's operations became visible -- the order the claim
-- keeps. Keys are locked in sorted order: two batches cannot deadlock each other.
SELECT count(pg_advisory_xact_lock(hashtextextended('pgoutbox ' || :schema || ' ' || k, 0)))
FROM (SELECT DISTINCT k FROM unnest(CAST(:ordering_keys AS text[])) AS keys(k) ORDER BY k) keys;

-- name: publish_savepoint_set
-- A psycopg publisher's batch with idempotency keys runs under this savepoint: a conflict found
-- after inserting undoes the batch's rows, not the caller's earlier work.
SAVEPOINT pgoutbox_publish_many;

-- name: publish_savepoint_release
-- The batch went through: keep its rows in the caller's transaction.
RELEASE SAVEPOINT pgoutbox_publish_many;

-- name: publish_savepoint_rollback
-- The batch conflicted: undo its rows, leave the caller's transaction usable.
ROLLBACK TO SAVEPOINT pgoutbox_publish_many;

-- name: operations_match_idempotency_keys
-- For each key given, the existing operation and whether it records the same intent.
SELECT o.id, o.idempotency_key,
       (o.operation_type = given.operation_type AND o.channel = given.channel
        AND o.payload = CAST(given.payload AS jsonb)) AS same_intent
FROM unnest(CAST(:idempotency_keys AS text[]), CAST(:operation_types AS text[]),
            CAST(:channels AS text[]), CAST(:payloads AS text[]))
     AS given(idempotency_key, operation_type, channel, payload)
JOIN {s}.operations o ON o.idempotency_key = given.idempotency_key;

-- name: operations_record_and_claim
-- Record these successes (operations_record_success, fenced the same way), then lock due
-- operations of this channel and these (type, lifecycle) pairs waiting for their first step
-- (pending or failed), highest priority then oldest first, lease up to :batch_size of them
-- (-> claimed) and return them. One statement for both, so a worker that has results and room
-- pays one round trip, one commit and one pass of the audit statement trigger: pass no
-- outcomes to only claim, :batch_size 0 to only record. Rows: the claimed operations, in the
-- order the work loops start them in, each with its publisher's trace context and how long it
-- waited since due (for the metrics); then the ids recorded, with `recorded` true. One with an
-- ordering key waits until every earlier operation of its key is finished (as of the
-- statement's start: an earlier one recorded by this very statement lets it go next time).
-- MATERIALIZED: the planner must not fold the CTE into the UPDATE, or the LIMIT and the
-- SKIP LOCKED row locks would no longer be applied once, before the update.
WITH recorded AS (
{operations_record_success}
), due AS MATERIALIZED (
    SELECT o.id
    FROM {s}.operations o
    WHERE o.state IN ('pending', 'failed')
      AND o.channel = :channel
      AND o.run_at <= now()
      AND (o.operation_type, o.lifecycle) IN (
          SELECT * FROM unnest(CAST(:operation_types AS text[]), CAST(:lifecycles AS text[])))
      AND (o.ordering_key IS NULL OR NOT EXISTS (
          SELECT 1 FROM {s}.operations p
          WHERE p.ordering_key = o.ordering_key AND p.id < o.id
            AND p.state NOT IN ('succeeded', 'cancelled')))
    ORDER BY o.priority DESC, o.run_at, o.id
    LIMIT :batch_size
    FOR UPDATE OF o SKIP LOCKED
), claimed AS (
    UPDATE {s}.operations o
    SET state = 'claimed', transition = 'claim', transition_actor = :worker_id,
        attempts = o.attempts + 1, step_attempts = o.step_attempts + 1,
        version = o.version + 1,
        lease_owner = :worker_id,
        lease_expires_at = now() + make_interval(secs => :lease_seconds)
    WHERE o.id = ANY (ARRAY(SELECT id FROM due))
    RETURNING o.id, o.operation_type, o.state, o.payload, o.attempts, o.step_attempts,
              o.max_attempts, o.version, o.idempotency_key, o.priority, o.run_at,
              o.trace_context,
              -- run_at is not changed by the claim: this is the wait since the op became due.
              CAST(EXTRACT(epoch FROM now() - o.run_at) AS float8) AS queue_age_seconds
)
SELECT recorded, id, operation_type, state, payload, attempts, step_attempts, max_attempts,
       version, idempotency_key, trace_context, queue_age_seconds
FROM (
    SELECT false AS recorded, id, operation_type, state, payload, attempts, step_attempts,
           max_attempts, version, idempotency_key, trace_context, queue_age_seconds, priority,
           run_at
    FROM claimed
    UNION ALL
    SELECT true, id, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL
    FROM recorded
) AS result
-- RETURNING has no defined order: sort explicitly (by columns the worker need not be sent).
ORDER BY recorded, priority DESC, run_at, id;

-- name: operations_claim_steps
-- The same for operations resting in a later step's state (these (type, state) pairs): leased
-- in place, their state unchanged. A separate statement, run only by workers with such steps:
-- one query for both kinds (a UNION) made every default-lifecycle claim about 10 % slower.
WITH due AS MATERIALIZED (
    SELECT o.id
    FROM {s}.operations o
    -- the predicate of the operations_resting index
    WHERE o.lease_owner IS NULL
      AND o.state NOT IN ('pending', 'claimed', 'failed', 'succeeded', 'dead', 'cancelled')
      AND o.channel = :channel
      AND o.run_at <= now()
      AND (o.operation_type, o.state) IN (
          SELECT * FROM unnest(CAST(:step_types AS text[]), CAST(:step_states AS text[])))
      AND (o.ordering_key IS NULL OR NOT EXISTS (
          SELECT 1 FROM {s}.operations p
          WHERE p.ordering_key = o.ordering_key AND p.id < o.id
            AND p.state NOT IN ('succeeded', 'cancelled')))
    ORDER BY o.priority DESC, o.run_at, o.id
    LIMIT :batch_size
    FOR UPDATE OF o SKIP LOCKED
), claimed AS (
    UPDATE {s}.operations o
    SET transition = 'claim', transition_actor = :worker_id,
        attempts = o.attempts + 1, step_attempts = o.step_attempts + 1,
        version = o.version + 1,
        lease_owner = :worker_id,
        lease_expires_at = now() + make_interval(secs => :lease_seconds)
    WHERE o.id = ANY (ARRAY(SELECT id FROM due))
    RETURNING o.id, o.operation_type, o.state, o.payload, o.attempts, o.step_attempts,
              o.max_attempts, o.version, o.idempotency_key, o.priority, o.run_at,
              o.trace_context,
              CAST(EXTRACT(epoch FROM now() - o.run_at) AS float8) AS queue_age_seconds
)
SELECT id, operation_type, state, payload, attempts, step_attempts, max_attempts, version,
       idempotency_key, trace_context, queue_age_seconds
FROM claimed
ORDER BY priority DESC, run_at, id;

-- name: operations_record_success
-- Fenced: only the attempt that still holds the lease (same version) can record its step's
-- outcome: the trigger it named, into the state that trigger leads to. Entering a new step
-- starts its attempt count afresh under its handler's own limit (a limit set by publish or
-- replay applied to the step it was set in); entering a parking state with a timeout sets
-- when it fires.
UPDATE {s}.operations o
SET state = done.to_state, transition = done.trigger, transition_actor = :worker_id,
    version = o.version + 1, lease_owner = NULL, lease_expires_at = NULL,
    step_attempts = CASE WHEN done.new_step THEN 0 ELSE o.step_attempts END,
    max_attempts = CASE WHEN done.new_step THEN NULL ELSE o.max_attempts END,
    run_at = CASE WHEN done.wait_seconds IS NULL THEN o.run_at
             ELSE now() + make_interval(secs => done.wait_seconds) END
FROM unnest(CAST(:ids AS bigint[]), CAST(:versions AS bigint[]), CAST(:to_states AS text[]),
            CAST(:triggers AS text[]), CAST(:new_steps AS boolean[]),
            CAST(:wait_seconds AS float8[]))
     AS done(id, version, to_state, trigger, new_step, wait_seconds)
WHERE o.id = done.id AND o.version = done.version AND o.lease_owner IS NOT DISTINCT FROM :worker_id
RETURNING o.id;

-- name: operations_record_failure
-- Fenced like success. A failed step waits in its retry state (failed, or a later step's own
-- state) base * 2^(attempt-1) seconds (capped), with jitter, in database time; attempts of the
-- step exhausted or a non-retryable error give up (to dead, or where the lifecycle says).
UPDATE {s}.operations o
SET state = CASE WHEN f.give_up OR o.step_attempts >= f.max_attempts THEN f.give_up_state
            ELSE f.retry_state END,
    transition = CASE WHEN f.give_up OR o.step_attempts >= f.max_attempts THEN 'give_up'
                 ELSE 'fail' END,
    transition_actor = :worker_id,
    transition_detail = f.detail,
    last_error = f.error,
    version = o.version + 1, lease_owner = NULL, lease_expires_at = NULL,
    step_attempts = CASE WHEN (f.give_up OR o.step_attempts >= f.max_attempts)
                              AND f.give_up_new_step THEN 0 ELSE o.step_attempts END,
    max_attempts = CASE WHEN (f.give_up OR o.step_attempts >= f.max_attempts)
                             AND f.give_up_new_step THEN NULL ELSE o.max_attempts END,
    run_at = CASE WHEN f.give_up OR o.step_attempts >= f.max_attempts THEN o.run_at
             ELSE now() + make_interval(secs => least(f.backoff_max,
                      -- capped exponent: 2^1024 overflows float8 and would fail the batch
                      f.backoff_base * power(2, least(o.step_attempts - 1, 64)))
                      * (1 - f.jitter * random())) END
FROM unnest(CAST(:ids AS bigint[]), CAST(:versions AS bigint[]), CAST(:errors AS text[]),
            CAST(:details AS text[]), CAST(:give_ups AS boolean[]),
            CAST(:max_attempts AS integer[]), CAST(:backoff_bases AS float8[]),
            CAST(:backoff_maxes AS float8[]), CAST(:jitters AS float8[]),
            CAST(:retry_states AS text[]), CAST(:give_up_states AS text[]),
            CAST(:give_up_new_steps AS boolean[]))
     AS f(id, version, error, detail, give_up, max_attempts, backoff_base, backoff_max, jitter,
          retry_state, give_up_state, give_up_new_step)
WHERE o.id = f.id AND o.version = f.version AND o.lease_owner IS NOT DISTINCT FROM :worker_id
RETURNING o.id, o.state;

-- name: operations_record_snooze
-- Fenced like success: a step that snoozed (Snooze, e.g. a provider's Retry-After) waits until
-- now() + seconds in its retry state (pending, or a later step's own state), its attempt given
-- back (step_attempts one less; attempts, the audit's attempt number, stays). Those already at
-- their max_snoozes are returned with snoozed = false, unchanged: they are recorded as failed
-- attempts instead.
WITH given AS MATERIALIZED (
    SELECT * FROM unnest(CAST(:ids AS bigint[]), CAST(:versions AS bigint[]),
                         CAST(:seconds AS float8[]), CAST(:max_snoozes AS integer[]),
                         CAST(:to_states AS text[]), CAST(:details AS text[]))
         AS g(id, version, seconds, max_snoozes, to_state, detail)
), snoozed AS (
    UPDATE {s}.operations o
    SET state = g.to_state, transition = 'snooze', transition_actor = :worker_id,
        transition_detail = g.detail || ' (snooze ' || (o.snoozes + 1) || ' of at most '
            || g.max_snoozes || '); due again at '
            || (now() + make_interval(secs => g.seconds))::text,
        run_at = now() + make_interval(secs => g.seconds),
        step_attempts = o.step_attempts - 1, snoozes = o.snoozes + 1,
        version = o.version + 1, lease_owner = NULL, lease_expires_at = NULL
    FROM given g
    WHERE o.id = g.id AND o.version = g.version AND o.lease_owner IS NOT DISTINCT FROM :worker_id
      AND o.snoozes < g.max_snoozes
    RETURNING o.id, o.state, o.snoozes
)
SELECT id, state, snoozes, true AS snoozed FROM snoozed
UNION ALL
SELECT o.id, o.state, o.snoozes, false
FROM {s}.operations o JOIN given g ON o.id = g.id AND o.version = g.version
WHERE o.lease_owner IS NOT DISTINCT FROM :worker_id AND o.snoozes >= g.max_snoozes;

-- name: operations_record_abort
-- Fenced like success: a handler stopped (or never started) at an operator's request for this
-- very attempt ends cancelled, audited in the operator's name ('abort'; the database refuses
-- it without the request).
UPDATE {s}.operations o
SET state = 'cancelled', transition = 'abort', transition_actor = o.cancel_requested_by,
    transition_detail = 'cancel requested by ' || o.cancel_requested_by || ' (role '
        || o.cancel_requested_role || ') at ' || o.cancel_requested_at::text
        || coalesce(': ' || o.cancel_request_reason, '') || '; attempt ' || o.attempts
        || ' stopped: ' || a.detail,
    version = o.version + 1, lease_owner = NULL, lease_expires_at = NULL
FROM unnest(CAST(:ids AS bigint[]), CAST(:versions AS bigint[]), CAST(:details AS text[]))
     AS a(id, version, detail)
WHERE o.id = a.id AND o.version = a.version AND o.lease_owner IS NOT DISTINCT FROM :worker_id
  AND o.cancel_request_version = o.version
RETURNING o.id, o.state;

-- name: operations_record_rejected
-- Audit a result that arrived after its lease was lost (no state change: the newer attempt
-- owns the outcome).
UPDATE {s}.operations o
SET transition = 'reject', transition_actor = :worker_id, transition_detail = r.detail
FROM unnest(CAST(:ids AS bigint[]), CAST(:details AS text[])) AS r(id, detail)
WHERE o.id = r.id;

-- name: audit_log_outcomes_recorded
-- Which of these attempts this worker already recorded the outcome of (a retry after a commit
-- whose reply was lost must not record them again, nor call them refused).
SELECT DISTINCT given.id
FROM unnest(CAST(:ids AS bigint[]), CAST(:attempts AS integer[])) AS given(id, attempt)
JOIN {s}.audit_log a ON a.operation_id = given.id AND a.attempt = given.attempt
-- the row after the claim: the step's outcome, whatever trigger it named (an abort names the
-- operator who asked for it)
WHERE (a.actor = :worker_id OR a.trigger = 'abort') AND a.trigger NOT IN ('claim', 'reject');

-- name: operations_extend_leases
-- Heartbeat: push the lease of what this worker still holds; returns the ids extended, and for
-- each the operator who asked that this attempt be cancelled (NULL: nobody).
-- SKIP LOCKED: a row locked right now is being recorded (by this worker, whose recorder locks
-- rows in another order: waiting could deadlock) or rescued; its lease no longer matters.
WITH held AS MATERIALIZED (
    SELECT o.id
    FROM {s}.operations o
    JOIN unnest(CAST(:ids AS bigint[]), CAST(:versions AS bigint[])) AS given(id, version)
      ON o.id = given.id AND o.version = given.version
    WHERE o.lease_owner IS NOT DISTINCT FROM :worker_id
    FOR UPDATE OF o SKIP LOCKED
)
UPDATE {s}.operations o
SET lease_expires_at = now() + make_interval(secs => :lease_seconds)
FROM held
WHERE o.id = held.id
RETURNING o.id,
          CASE WHEN o.cancel_request_version = o.version THEN o.cancel_requested_by END
              AS cancel_requested_by;

-- name: operations_rescue_expired
-- Move operations whose lease expired (their worker died or stalled) to their step's retry
-- state (failed, or a later step's own state) or to dead, per the step's on_lost policy and
-- attempts. Fenced by the row lock: a worker recording at the same moment either wins (the
-- lease is gone) or finds the version changed. An attempt an operator asked to cancel is
-- cancelled instead ('abort', in the operator's name), never retried.
WITH expired AS MATERIALIZED (
    SELECT o.id, p.on_lost_dead, p.max_attempts
    FROM {s}.operations o
    JOIN unnest(CAST(:operation_types AS text[]), CAST(:steps AS text[]),
                CAST(:on_lost_dead AS boolean[]), CAST(:max_attempts AS integer[]))
         AS p(operation_type, step, on_lost_dead, max_attempts)
      ON p.operation_type = o.operation_type AND p.step = o.state
    WHERE o.lease_owner IS NOT NULL AND o.lease_expires_at < now() AND o.channel = :channel
    ORDER BY o.lease_expires_at
    LIMIT :limit
    FOR UPDATE OF o SKIP LOCKED
)
UPDATE {s}.operations o
SET state = CASE WHEN o.cancel_request_version = o.version THEN 'cancelled'
                 WHEN e.on_lost_dead
                      OR o.step_attempts >= coalesce(o.max_attempts, e.max_attempts) THEN 'dead'
                 WHEN o.state = 'claimed' THEN 'failed'
                 ELSE o.state END,
    transition = CASE WHEN o.cancel_request_version = o.version THEN 'abort' ELSE 'lose' END,
    transition_actor = CASE WHEN o.cancel_request_version = o.version
                            THEN o.cancel_requested_by ELSE :worker_id END,
    transition_detail = 'lease of ' || coalesce(o.lease_owner, '?') || ' expired at '
        || o.lease_expires_at::text
        || CASE WHEN o.cancel_request_version = o.version
                THEN '; cancel requested by ' || o.cancel_requested_by || ' (role '
                     || o.cancel_requested_role || ') at ' || o.cancel_requested_at::text
                     || coalesce(': ' || o.cancel_request_reason, '') || '; honoured by '
                     || :worker_id || ', not retried'
                WHEN e.on_lost_dead THEN '; on_lost=dead: the handler may have run, not retried'
                ELSE '' END,
    last_error = 'lease expired: worker ' || coalesce(o.lease_owner, '?') || ' was lost',
    version = o.version + 1, lease_owner = NULL, lease_expires_at = NULL, run_at = now()
FROM expired e
WHERE o.id = e.id
RETURNING o.id, o.state, o.operation_type;

-- name: operations_expire_parked
-- Fire the timeout trigger of operations parked longer than their state allows (run_at is set
-- to the deadline on entry). A working state it leads to is claimable at once.
WITH expired AS MATERIALIZED (
    SELECT o.id, t.trigger, t.to_state, t.new_step
    FROM {s}.operations o
    JOIN unnest(CAST(:lifecycles AS text[]), CAST(:states AS text[]),
                CAST(:triggers AS text[]), CAST(:to_states AS text[]),
                CAST(:new_steps AS boolean[]))
         AS t(lifecycle, state, trigger, to_state, new_step)
      ON t.lifecycle = o.lifecycle AND t.state = o.state
    -- the predicate of the operations_resting index
    WHERE o.lease_owner IS NULL
      AND o.state NOT IN ('pending', 'claimed', 'failed', 'succeeded', 'dead', 'cancelled')
      AND o.channel = :channel AND o.run_at <= now()
    ORDER BY o.run_at
    LIMIT :limit
    FOR UPDATE OF o SKIP LOCKED
)
UPDATE {s}.operations o
SET state = e.to_state, transition = e.trigger, transition_actor = :worker_id,
    transition_detail = 'timed out: parked in ' || o.state || ' since '
        || o.updated_at::text || ', due to move on at ' || o.run_at::text,
    step_attempts = CASE WHEN e.new_step THEN 0 ELSE o.step_attempts END,
    max_attempts = CASE WHEN e.new_step THEN NULL ELSE o.max_attempts END,
    version = o.version + 1, run_at = now()
FROM expired e
WHERE o.id = e.id
RETURNING o.id, o.state;

-- name: operations_release
-- Hand back operations this worker holds (to where their step starts again, or to dead for a
-- started step with on_lost=dead), saying why: a graceful stop before their handler finished,
-- or leases whose claim's reply was lost.
UPDATE {s}.operations o
SET state = r.to_state,
    transition = CASE WHEN r.on_lost_dead THEN 'lose' ELSE 'release' END,
    transition_actor = :worker_id,
    transition_detail = :detail,
    last_error = CASE WHEN r.on_lost_dead THEN 'worker stopped mid-handler (on_lost=dead)'
                 ELSE o.last_error END,
    version = o.version + 1, lease_owner = NULL, lease_expires_at = NULL
FROM unnest(CAST(:ids AS bigint[]), CAST(:versions AS bigint[]), CAST(:on_lost_dead AS boolean[]),
            CAST(:to_states AS text[]))
     AS r(id, version, on_lost_dead, to_state)
WHERE o.id = r.id AND o.version = r.version AND o.lease_owner IS NOT DISTINCT FROM :worker_id
RETURNING o.id;

-- name: operations_leased_to
-- What is leased to this worker besides what it holds (:held): operations a claiming statement
-- leased although its reply never reached the worker.
SELECT id, version, state
FROM {s}.operations
WHERE lease_owner = :worker_id AND NOT (id = ANY (CAST(:held AS bigint[])));

-- name: operations_next_run_at
-- When the next operation this worker could claim becomes due (NULL: none waiting).
SELECT least(
    (SELECT min(o.run_at) FROM {s}.operations o
     WHERE o.state IN ('pending', 'failed') AND o.channel = :channel
       AND o.operation_type = ANY(CAST(:operation_types AS text[]))
       -- held back by its ordering key: not due, whatever its run_at
       AND (o.ordering_key IS NULL OR NOT EXISTS (
           SELECT 1 FROM {s}.operations p
           WHERE p.ordering_key = o.ordering_key AND p.id < o.id
             AND p.state NOT IN ('succeeded', 'cancelled')))),
    (SELECT min(o.run_at) FROM {s}.operations o
     WHERE CAST(:has_steps AS boolean)
       AND o.lease_owner IS NULL
       AND o.state NOT IN ('pending', 'claimed', 'failed', 'succeeded', 'dead', 'cancelled')
       AND o.channel = :channel
       AND (o.operation_type, o.state) IN (
           SELECT * FROM unnest(CAST(:step_types AS text[]), CAST(:step_states AS text[]))))
) - now() AS wait;

-- name: workers_register
-- Announce a live worker (operators see it in `pgoutbox workers`).
INSERT INTO {s}.workers (id, hostname, pid, channel, operation_types)
VALUES (:worker_id, :hostname, :pid, :channel, CAST(:operation_types AS text[]))
ON CONFLICT (id) DO UPDATE SET heartbeat_at = now();

-- name: workers_heartbeat
-- Mark a worker alive.
UPDATE {s}.workers SET heartbeat_at = now() WHERE id = :worker_id;

-- name: workers_prune
-- Forget workers whose heartbeat stopped long ago (killed without a graceful stop).
DELETE FROM {s}.workers
WHERE heartbeat_at < now() - make_interval(secs => :stale_seconds)
RETURNING id;

-- name: workers_unregister
-- Remove a worker that stopped.
DELETE FROM {s}.workers WHERE id = :worker_id;

-- name: audit_log_page
-- The audit chains in (operation_id, seq) order, after a keyset position, with each
-- operation's recorded chain head.
SELECT a.operation_id, a.seq, a.operation_type, a.from_state, a.to_state, a.trigger, a.attempt,
       a.actor, a.db_role, a.detail, a.recorded_at, a.prev_hash, a.hash, a.intent_hash,
       o.id IS NOT NULL AS operation_exists, o.audit_seq AS head_seq, o.audit_hash AS head_hash,
       o.state AS current_state
FROM {s}.audit_log a
-- The lower bound lets the merge join start at the page: without it the generic plan reads
-- operations from the first id on every page, and a walk takes time quadratic in the log.
LEFT JOIN {s}.operations o ON o.id = a.operation_id AND o.id >= :after_operation_id
WHERE (a.operation_id, a.seq) > (:after_operation_id, :after_seq)
ORDER BY a.operation_id, a.seq
LIMIT :limit;

-- name: operations_without_audit
-- Operations whose chain has no first row at all.
SELECT o.id FROM {s}.operations o
WHERE NOT EXISTS (SELECT 1 FROM {s}.audit_log a WHERE a.operation_id = o.id AND a.seq = 1)
  -- seq 1 of an archived operation is in its archive
  AND NOT EXISTS (SELECT 1 FROM {s}.audit_archive_heads h WHERE h.operation_id = o.id)
ORDER BY o.id
LIMIT 1;

-- name: audit_log_count
-- How many audit rows there are (for progress reporting).
SELECT count(*) FROM {s}.audit_log;

-- =============================================================================================
-- admin
-- The operator tools (pgoutbox.admin, behind `pgoutbox ops`, `stats`, `workers` and
-- `audit report`). Kept together at the end of the file, apart from the worker's queries above.
-- =============================================================================================

-- name: database_now
-- The database's clock (relative times such as "7d ago" are resolved against it).
SELECT now();

-- name: operations_admin_list
-- Operations matching an operator's filters, newest first, each with why it is stale (if it
-- is): "unhandled" (waiting for a step -- pending, failed, or resting in a later working state
-- of its lifecycle -- and no live worker of its channel handles its type), "overdue" (waiting
-- for a step and due for longer than the threshold), "lease_expired" (running a step, its
-- lease expired longer than the threshold ago and nobody rescued it). Parked operations wait
-- for a person by design and are never stale.
SELECT *
FROM (
    SELECT o.id, o.operation_type, o.channel, o.lifecycle, o.state, o.attempts, o.max_attempts,
           o.priority, o.run_at, o.idempotency_key, o.created_at, o.created_by, o.updated_at,
           o.last_error, o.lease_owner, o.lease_expires_at, o.version,
           CASE
               WHEN o.waiting AND NOT EXISTS (
                   SELECT 1 FROM {s}.workers w
                   WHERE w.channel = o.channel AND o.operation_type = ANY(w.operation_types)
                     AND w.heartbeat_at > now() - make_interval(secs => :live_within_seconds)
               ) THEN 'unhandled'
               WHEN o.waiting
                    AND o.run_at < now() - make_interval(secs => :older_than_seconds)
                   THEN 'overdue'
               WHEN o.lease_owner IS NOT NULL
                    AND o.lease_expires_at < now() - make_interval(secs => :older_than_seconds)
                   THEN 'lease_expired'
           END AS stale_reason
    FROM (
        SELECT op.*,
               op.state IN ('pending', 'failed')
               OR (op.lease_owner IS NULL AND op.lifecycle <> 'default' AND EXISTS (
                   SELECT 1 FROM {s}.lifecycles l
                   WHERE l.name = op.lifecycle AND l.definition -> 'working' @> to_jsonb(op.state)
               )) AS waiting
        FROM {s}.operations op
        WHERE (CAST(:states AS text[]) IS NULL OR op.state = ANY(CAST(:states AS text[])))
          AND (CAST(:type_patterns AS text[]) IS NULL
               OR op.operation_type LIKE ANY(CAST(:type_patterns AS text[])))
          AND (CAST(:channels AS text[]) IS NULL OR op.channel = ANY(CAST(:channels AS text[])))
          AND (CAST(:since AS timestamptz) IS NULL
               OR op.created_at >= CAST(:since AS timestamptz))
          AND (CAST(:until AS timestamptz) IS NULL
               OR op.created_at < CAST(:until AS timestamptz))
          AND (NOT CAST(:stale AS boolean) OR op.state NOT IN ('succeeded', 'dead', 'cancelled'))
    ) o
) listed
WHERE NOT CAST(:stale AS boolean) OR stale_reason IS NOT NULL
ORDER BY id DESC
LIMIT :limit;

-- name: operations_admin_get
-- One operation with its payload (as JSON text), for `pgoutbox ops show`.
SELECT id, operation_type, channel, lifecycle, state, attempts, max_attempts, priority, run_at,
       idempotency_key, created_at, created_by, updated_at, last_error, lease_owner,
       lease_expires_at, version, CAST(payload AS text) AS payload
FROM {s}.operations
WHERE id = :id;

-- name: audit_log_of_operation
-- One operation's audit chain in order (it outlives the operation row when that is purged).
SELECT operation_id, seq, operation_type, from_state, to_state, trigger, attempt, actor, db_role,
       detail, recorded_at, prev_hash, hash
FROM {s}.audit_log
WHERE operation_id = :operation_id
ORDER BY seq;

-- name: operations_lock_for_admin
-- The operation an operator acts on, locked until the action commits (so the state named in a
-- refusal is the state the database refused).
SELECT id, state, lifecycle, lease_owner, version, audit_seq,
       coalesce(cancel_request_version = version, false) AS cancel_requested,
       (SELECT CAST(l.definition AS text) FROM {s}.lifecycles l
        WHERE l.name = lifecycle ORDER BY l.version DESC LIMIT 1) AS definition,
       -- where a dead or cancelled operation stopped: the state it left for its final one
       (SELECT a.from_state FROM {s}.audit_log a
        WHERE a.operation_id = id AND a.to_state = state
          AND a.from_state IS DISTINCT FROM a.to_state
        ORDER BY a.seq DESC LIMIT 1) AS stopped_in
FROM {s}.operations WHERE id = :id FOR UPDATE;

-- name: operations_retry
-- Operator: run a failed operation (or a later step waiting to retry) now. The audit trigger
-- records it and refuses other states.
WITH retried AS (
    UPDATE {s}.operations o
    SET state = CASE WHEN o.state = 'failed' THEN 'pending' ELSE o.state END,
        transition = 'retry', transition_actor = :actor,
        transition_detail = :reason, run_at = now(), version = o.version + 1
    WHERE o.id = :id
    RETURNING o.id, o.channel, o.state
)
SELECT id, state, pg_notify(channel, id::text) FROM retried;

-- name: operations_cancel
-- Operator: cancel a pending, failed or dead operation (audited; other states are refused).
UPDATE {s}.operations o
SET state = 'cancelled', transition = 'cancel', transition_actor = :actor,
    transition_detail = :reason, version = o.version + 1
WHERE o.id = :id
RETURNING o.id, o.state;

-- name: operations_request_cancel
-- Operator: ask the worker running this operation to cancel its handler (the trigger stamps
-- the time, the role and the attempt's version, and refuses a second request for it). The
-- notification reaches the holder at once; its heartbeat finds the request anyway.
WITH requested AS (
    UPDATE {s}.operations o
    SET cancel_requested_by = :actor, cancel_request_reason = :reason
    WHERE o.id = :id
    RETURNING o.id, o.channel, o.version, o.audit_seq, o.lease_owner, o.lease_expires_at,
              o.cancel_requested_at
)
SELECT id, version, audit_seq, lease_owner, lease_expires_at, cancel_requested_at,
       pg_notify(channel, 'cancel:' || id::text)
FROM requested;

-- name: operations_cancel_outcome
-- What became of a cancel request of attempt (version) :version: NULL while that attempt is
-- still running, else the first audit row after it (trigger 'abort': cancelled; anything else:
-- the handler finished first, or its lease was lost).
SELECT o.version <> CAST(:version AS bigint) AS ended, o.state, o.lease_owner,
       o.lease_expires_at, now() AS now,
       (SELECT a.trigger FROM {s}.audit_log a
        WHERE a.operation_id = o.id AND a.seq > :seq AND a.trigger <> 'reject'
        ORDER BY a.seq LIMIT 1) AS trigger,
       (SELECT a.to_state FROM {s}.audit_log a
        WHERE a.operation_id = o.id AND a.seq > :seq AND a.trigger <> 'reject'
        ORDER BY a.seq LIMIT 1) AS to_state
FROM {s}.operations o WHERE o.id = :id;

-- name: operations_replay
-- Operator: run a dead or cancelled operation again from where it stopped (:to_state), now,
-- with extra_attempts more attempts of that step. attempts keeps counting, so the audit
-- trail's attempt numbers stay unique.
WITH replayed AS (
    UPDATE {s}.operations o
    SET state = :to_state, transition = 'replay', transition_actor = :actor,
        transition_detail = :reason, version = o.version + 1,
        run_at = now() + make_interval(secs => coalesce(CAST(:wait_seconds AS float8), 0)),
        max_attempts = o.step_attempts + CAST(:extra_attempts AS integer)
    WHERE o.id = :id
    RETURNING o.id, o.channel, o.state
)
SELECT id, state, pg_notify(channel, id::text) FROM replayed;

-- name: audit_log_report
-- Every audit row recorded in [since, until), optionally of some operation types, in the
-- order it was recorded: the compliance report. A NULL since: from the first row.
SELECT operation_id, seq, operation_type, from_state, to_state, trigger, attempt, actor, db_role,
       detail, recorded_at, prev_hash, hash
FROM {s}.audit_log
WHERE recorded_at >= coalesce(CAST(:since AS timestamptz), '-infinity') AND recorded_at < :until
  AND (CAST(:type_patterns AS text[]) IS NULL
       OR operation_type LIKE ANY(CAST(:type_patterns AS text[])))
ORDER BY recorded_at, operation_id, seq;

-- name: operations_admin_stats
-- Operations per type and state, and how long the oldest due pending one has waited.
SELECT operation_type, state, count(*) AS operations,
       CAST(EXTRACT(epoch FROM now() - min(run_at) FILTER (
           WHERE state = 'pending' AND run_at <= now())) AS float8) AS oldest_pending_seconds
FROM {s}.operations
GROUP BY operation_type, state
ORDER BY operation_type, state;

-- name: operations_oldest_pending
-- The due pending operation that has waited longest (no row: none waiting).
SELECT id, CAST(EXTRACT(epoch FROM now() - run_at) AS float8) AS waiting_seconds
FROM {s}.operations
WHERE state = 'pending' AND run_at <= now()
ORDER BY run_at, id
LIMIT 1;

-- name: audit_log_attempt_outcomes
-- Attempt outcomes recorded since a time, per type; all but "succeed" count as failed.
SELECT operation_type, count(*) AS finished,
       count(*) FILTER (WHERE trigger <> 'succeed') AS failed
FROM {s}.audit_log
WHERE recorded_at >= :since AND from_state = 'claimed'
  AND trigger IN ('succeed', 'fail', 'give_up', 'lose')
GROUP BY operation_type;

-- name: workers_admin_list
-- Registered workers, whether each is live (heartbeat recent enough), and what each holds.
SELECT w.id, w.hostname, w.pid, w.channel, w.operation_types, w.started_at, w.heartbeat_at,
       CAST(EXTRACT(epoch FROM now() - w.heartbeat_at) AS float8) AS heartbeat_age_seconds,
       w.heartbeat_at > now() - make_interval(secs => :live_within_seconds) AS live,
       ARRAY(SELECT o.id FROM {s}.operations o
             WHERE o.lease_owner = w.id ORDER BY o.id) AS held
FROM {s}.workers w
ORDER BY w.channel, w.started_at, w.id;

-- name: role_grants_add
-- Record that a role acts as a kind (pgoutbox db grant); the audit trigger reads these.
INSERT INTO {s}.role_grants (role, kind) VALUES (:role, :kind) ON CONFLICT DO NOTHING;

-- name: role_grants_kinds
-- Every kind a role has been granted, this time and before.
SELECT kind FROM {s}.role_grants WHERE role = :role ORDER BY kind;

-- name: operations_count_purgeable
-- What a purge would delete: finished operations in these states, finished before a time.
SELECT state, count(*) AS operations
FROM {s}.operations
WHERE state = ANY(CAST(:states AS text[])) AND updated_at < :finished_before
GROUP BY state
ORDER BY state;

-- name: purges_start
-- Record that a purge begins (its count grows with every batch).
INSERT INTO {s}.purges (actor, finished_before, include_dead, batch_size)
VALUES (:actor, :finished_before, :include_dead, :batch_size)
RETURNING id, started_at;

-- name: purge_name_for_trigger
-- For this transaction: the purge deleting operations, and its actor, which the deletion
-- trigger writes into each deleted operation's last audit row.
SELECT set_config('pgoutbox.purge', :purge_id, true), set_config('pgoutbox.purge_actor', :actor, true);

-- name: operations_purge_batch
-- Delete one batch of finished operations and add its count to the purge's record, in one
-- transaction. Their audit rows stay. MATERIALIZED: the LIMIT and the row locks apply once,
-- before the delete; SKIP LOCKED leaves rows an operator is replaying right now alone.
WITH doomed AS MATERIALIZED (
    SELECT id
    FROM {s}.operations
    WHERE state = ANY(CAST(:states AS text[])) AND updated_at < :finished_before
    ORDER BY id
    LIMIT :batch_size
    FOR UPDATE SKIP LOCKED
), deleted AS (
    DELETE FROM {s}.operations o USING doomed WHERE o.id = doomed.id RETURNING o.state
), counted AS (
    SELECT count(*) AS n FROM deleted
), recorded AS (
    UPDATE {s}.purges p SET deleted = p.deleted + counted.n FROM counted WHERE p.id = :purge_id
)
SELECT state, count(*) AS operations FROM deleted GROUP BY state;

-- name: purges_finish
-- Record that a purge completed.
UPDATE {s}.purges SET finished_at = clock_timestamp() WHERE id = :purge_id
RETURNING finished_at;

-- =============================================================================================
-- lifecycles
-- Registering operation types' lifecycles (pgoutbox.registry) and firing external triggers
-- (pgoutbox.fire).
-- =============================================================================================

-- name: lifecycles_lock
-- One registration at a time (many workers may start together), until the transaction ends.
SELECT pg_advisory_xact_lock(hashtext('pgoutbox lifecycles ' || :schema));

-- name: lifecycles_latest
-- The newest registered version of each of these lifecycles.
SELECT DISTINCT ON (name) name, version, digest, CAST(definition AS text) AS definition,
       registered_at, registered_by
FROM {s}.lifecycles
WHERE name = ANY(CAST(:names AS text[]))
ORDER BY name, version DESC;

-- name: lifecycle_types_get
-- The lifecycle registered for each of these operation types (types not listed: default).
SELECT operation_type, lifecycle
FROM {s}.lifecycle_types
WHERE operation_type = ANY(CAST(:operation_types AS text[]));

-- name: operations_in_removed_states
-- Operations of a lifecycle sitting in states a new version of it removes (at most 20).
SELECT id, state, count(*) OVER () AS total
FROM {s}.operations
WHERE lifecycle = :lifecycle AND state = ANY(CAST(:states AS text[]))
ORDER BY id
LIMIT 20;

-- name: operations_unfinished_in_other_lifecycle
-- Unfinished operations of a type under a lifecycle other than the one about to be registered
-- for it (at most 20): workers of the new lifecycle would never move them.
SELECT id, lifecycle, state, count(*) OVER () AS total
FROM {s}.operations
WHERE operation_type = :operation_type AND lifecycle <> :lifecycle
  AND state NOT IN ('succeeded', 'cancelled')
ORDER BY id
LIMIT 20;

-- name: lifecycles_register_version
-- Record a new version of a lifecycle; returns its number.
INSERT INTO {s}.lifecycles (name, version, digest, definition)
SELECT :lifecycle, coalesce(max(version), 0) + 1, :digest, CAST(:definition AS jsonb)
FROM {s}.lifecycles WHERE name = :lifecycle
RETURNING version;

-- name: lifecycle_transitions_clear
-- Forget a lifecycle's allowed transitions (in the transaction that adds its new ones).
DELETE FROM {s}.lifecycle_transitions WHERE lifecycle = :lifecycle;

-- name: lifecycle_transitions_add
-- Allow these transitions in a lifecycle.
INSERT INTO {s}.lifecycle_transitions (lifecycle, from_state, trigger, to_state)
SELECT :lifecycle, f, t, d
FROM unnest(CAST(:from_states AS text[]), CAST(:triggers AS text[]),
            CAST(:to_states AS text[])) AS added(f, t, d);

-- name: lifecycle_types_set
-- Say which lifecycle an operation type runs.
INSERT INTO {s}.lifecycle_types (operation_type, lifecycle)
VALUES (:operation_type, :lifecycle)
ON CONFLICT (operation_type) DO UPDATE SET lifecycle = EXCLUDED.lifecycle;

-- name: lifecycle_types_unset
-- An operation type goes back to the default lifecycle.
DELETE FROM {s}.lifecycle_types WHERE operation_type = :operation_type;

-- name: operations_lock_for_fire
-- The operation a trigger is fired at, locked until the change commits, with the newest
-- registered definition of its lifecycle (NULL for the default lifecycle).
SELECT o.id, o.state, o.lifecycle, o.operation_type, o.lease_owner,
       (SELECT CAST(l.definition AS text) FROM {s}.lifecycles l
        WHERE l.name = o.lifecycle ORDER BY l.version DESC LIMIT 1) AS definition
FROM {s}.operations o
WHERE o.id = :id
FOR UPDATE OF o;

-- name: operations_fire
-- Move an operation on by an external trigger (the audit trigger checks it against the
-- lifecycle and records the actor); a step it leads to is due now, and workers are woken.
WITH fired AS (
    UPDATE {s}.operations o
    SET state = :to_state, transition = :trigger, transition_actor = :actor,
        transition_detail = :detail, version = o.version + 1,
        step_attempts = CASE WHEN CAST(:new_step AS boolean) THEN 0 ELSE o.step_attempts END,
        max_attempts = CASE WHEN CAST(:new_step AS boolean) THEN NULL ELSE o.max_attempts END,
        run_at = now() + make_interval(secs => coalesce(CAST(:wait_seconds AS float8), 0))
    WHERE o.id = :id
    RETURNING o.id, o.channel, o.state
)
SELECT id, state, CASE WHEN CAST(:wake AS boolean) THEN pg_notify(channel, id::text) END
FROM fired;

-- =============================================================================================
-- web console
-- The pages of pgoutbox.web that the operator tools above do not already read.
-- =============================================================================================

-- name: web_operations_page
-- One page of the operations list, newest first, below a keyset position (:before) and no
-- lower than :floor: the primary key is walked backwards and each page reads at most the ids
-- between the two, however rare the filtered-for operations are (a payload search, a state).
SELECT id, operation_type, channel, lifecycle, state, attempts, max_attempts, priority, run_at,
       idempotency_key, ordering_key, created_at, updated_at, last_error, lease_owner
FROM {s}.operations
WHERE id < :before AND id >= :floor
  AND (CAST(:states AS text[]) IS NULL OR state = ANY(CAST(:states AS text[])))
  AND (CAST(:type_patterns AS text[]) IS NULL
       OR operation_type LIKE ANY(CAST(:type_patterns AS text[])))
  AND (CAST(:channels AS text[]) IS NULL OR channel = ANY(CAST(:channels AS text[])))
  AND (CAST(:since AS timestamptz) IS NULL OR created_at >= CAST(:since AS timestamptz))
  AND (CAST(:until AS timestamptz) IS NULL OR created_at < CAST(:until AS timestamptz))
  AND (CAST(:ordering_key AS text) IS NULL OR ordering_key = CAST(:ordering_key AS text))
  AND (CAST(:search AS text) IS NULL
       OR strpos(CAST(payload AS text), CAST(:search AS text)) > 0)
ORDER BY id DESC
LIMIT :limit;

-- name: web_operations_scan_floor
-- The lowest id among the :scan operations below :before (an index-only walk of the primary
-- key): how far one filtered page of the list may read.
SELECT min(id) FROM (
    SELECT id FROM {s}.operations WHERE id < :before ORDER BY id DESC LIMIT :scan
) window_ids;

-- name: web_operation_by_idempotency_key
-- The operation holding an idempotency key (the unique index answers it).
SELECT id FROM {s}.operations WHERE idempotency_key = :idempotency_key;

-- name: web_attempt_outcomes_over_time
-- Attempt outcomes per time bucket since a time (the overview's chart): succeeded, and failed
-- (fail, give_up, lose), counted as audit_log_attempt_outcomes counts them.
SELECT date_bin(make_interval(secs => :bucket_seconds), recorded_at, :since) AS bucket,
       count(*) FILTER (WHERE trigger = 'succeed') AS succeeded,
       count(*) FILTER (WHERE trigger <> 'succeed') AS failed
FROM {s}.audit_log
WHERE recorded_at >= :since AND from_state = 'claimed'
  AND trigger IN ('succeed', 'fail', 'give_up', 'lose')
GROUP BY 1
ORDER BY 1;

-- name: web_lifecycles_all
-- Every registered version of every lifecycle, newest version first.
SELECT name, version, digest, CAST(definition AS text) AS definition, registered_at,
       registered_by
FROM {s}.lifecycles
ORDER BY name, version DESC;

-- name: web_lifecycle_types_all
-- Which lifecycle each operation type with its own runs.
SELECT operation_type, lifecycle FROM {s}.lifecycle_types ORDER BY operation_type;

-- name: web_audit_chain_of_operation
-- One operation's audit chain with its recorded head, as audit_log_page gives it for every
-- operation: what the operation page verifies.
SELECT a.operation_id, a.seq, a.operation_type, a.from_state, a.to_state, a.trigger, a.attempt,
       a.actor, a.db_role, a.detail, a.recorded_at, a.prev_hash, a.hash, a.intent_hash,
       o.id IS NOT NULL AS operation_exists, o.audit_seq AS head_seq, o.audit_hash AS head_hash,
       o.state AS current_state
FROM {s}.audit_log a
LEFT JOIN {s}.operations o ON o.id = a.operation_id
WHERE a.operation_id = :operation_id
ORDER BY a.seq;

-- name: flow_limits_declare
-- A worker's router declares its limits (at start): the newest declaration of a name wins.
INSERT INTO {s}.flow_limits AS l (name, operation_types, partition_by, concurrency, rate_count,
                                  rate_period_seconds, burst)
SELECT d.name, string_to_array(d.types, ' '), d.partition_by, d.concurrency, d.rate_count,
       d.rate_period_seconds, d.burst
FROM unnest(CAST(:names AS text[]), CAST(:types AS text[]), CAST(:partition_bys AS text[]),
            CAST(:concurrencies AS integer[]), CAST(:rate_counts AS integer[]),
            CAST(:rate_periods AS float8[]), CAST(:bursts AS integer[]))
     AS d(name, types, partition_by, concurrency, rate_count, rate_period_seconds, burst)
ON CONFLICT (name) DO UPDATE
SET operation_types = EXCLUDED.operation_types, partition_by = EXCLUDED.partition_by,
    concurrency = EXCLUDED.concurrency, rate_count = EXCLUDED.rate_count,
    rate_period_seconds = EXCLUDED.rate_period_seconds, burst = EXCLUDED.burst,
    declared_at = now(), declared_by = CURRENT_USER
WHERE (l.operation_types, l.partition_by, l.concurrency, l.rate_count, l.rate_period_seconds,
       l.burst)
      IS DISTINCT FROM (EXCLUDED.operation_types, EXCLUDED.partition_by, EXCLUDED.concurrency,
       EXCLUDED.rate_count, EXCLUDED.rate_period_seconds, EXCLUDED.burst);

-- name: flow_overrides_in_force
-- The newest override of each limit that has one (all NULL: back to the declaration).
SELECT DISTINCT ON (limit_name) limit_name, concurrency, rate_count, rate_period_seconds, burst,
       actor, reason, db_role, set_at
FROM {s}.flow_overrides
ORDER BY limit_name, id DESC;

-- name: flow_pauses_open
-- The pauses in force, oldest first.
SELECT id, scope, target, partition, paused_by, pause_reason, paused_role, paused_at
FROM {s}.flow_pauses
WHERE resumed_at IS NULL
ORDER BY id;

-- name: flow_pauses_add
-- Pause a channel, a type or a limit (one partition of it, with :partition); NULL when that
-- target is paused already (the open pause stays as it is).
INSERT INTO {s}.flow_pauses (scope, target, partition, paused_by, pause_reason)
VALUES (:scope, :target, :partition, :actor, :reason)
ON CONFLICT (scope, target, coalesce(partition, '')) WHERE resumed_at IS NULL DO NOTHING
RETURNING id, paused_at;

-- name: flow_pauses_close
-- Resume: close the open pause of this target; no row when it was not paused.
UPDATE {s}.flow_pauses
SET resumed_by = :actor, resume_reason = :reason
WHERE scope = :scope AND target = :target AND partition IS NOT DISTINCT FROM :partition
  AND resumed_at IS NULL
RETURNING id, paused_at, resumed_at;

-- name: flow_overrides_add
-- An operator's override of a limit's numbers (NULL: the declared value).
INSERT INTO {s}.flow_overrides (limit_name, concurrency, rate_count, rate_period_seconds, burst,
                                actor, reason)
VALUES (:limit_name, :concurrency, :rate_count, :rate_period_seconds, :burst, :actor, :reason)
RETURNING id, set_at;

-- name: flow_limits_all
-- Every declared limit with the override in force, and how many of its operations hold a lease.
SELECT l.name, l.operation_types, l.partition_by, l.concurrency, l.rate_count,
       l.rate_period_seconds, l.burst, l.declared_at,
       o.concurrency AS override_concurrency, o.rate_count AS override_rate_count,
       o.rate_period_seconds AS override_rate_period_seconds, o.burst AS override_burst,
       o.actor AS override_actor, o.reason AS override_reason, o.set_at AS override_set_at,
       (SELECT count(*) FROM {s}.operations r
        WHERE r.lease_owner IS NOT NULL AND r.operation_type = ANY(l.operation_types)) AS running
FROM {s}.flow_limits l
LEFT JOIN LATERAL (
    SELECT * FROM {s}.flow_overrides f WHERE f.limit_name = l.name ORDER BY f.id DESC LIMIT 1
) o ON true
ORDER BY l.name;

-- name: flow_lock
-- Serialise the claims of these limits across every worker until the transaction ends, keys
-- taken in one order so two claims cannot deadlock; returns the database's clock (the claims'
-- transaction time, which the rate buckets and the claim's audit rows both use).
SELECT CAST(EXTRACT(epoch FROM now()) AS float8) AS now, count(pg_advisory_xact_lock(k)) AS locked
FROM (SELECT hashtextextended(:schema || '.' || name, 0) AS k
      FROM unnest(CAST(:names AS text[])) AS name ORDER BY 1) AS keys;

-- name: operations_flow_running
-- How many operations of each limit's types hold a lease, per partition: one row per (limit
-- number, type, partition kind, payload path) given.
SELECT x.n, coalesce(CASE x.kind WHEN 'ordering_key' THEN o.ordering_key
                                 WHEN 'payload' THEN o.payload #>> string_to_array(x.path, '.')
                     END, '') AS partition,
       count(*) AS running
FROM unnest(CAST(:numbers AS integer[]), CAST(:types AS text[]), CAST(:kinds AS text[]),
            CAST(:paths AS text[])) AS x(n, type, kind, path)
JOIN {s}.operations o ON o.operation_type = x.type AND o.lease_owner IS NOT NULL
GROUP BY 1, 2;

-- name: flow_buckets_of
-- The rate buckets of these limits (theoretical arrival time, epoch seconds).
SELECT limit_name, partition, CAST(EXTRACT(epoch FROM tat) AS float8) AS tat
FROM {s}.flow_buckets
WHERE limit_name = ANY(CAST(:names AS text[]));

-- name: flow_buckets_save
-- Move rate buckets after a claim; a bucket whose time has passed says nothing more than a
-- missing one (a full bucket), so those of these limits are dropped (the table stays small).
WITH saved AS (
    INSERT INTO {s}.flow_buckets AS b (limit_name, partition, tat)
    SELECT n, p, to_timestamp(t)
    FROM unnest(CAST(:names AS text[]), CAST(:partitions AS text[]), CAST(:tats AS float8[]))
         AS given(n, p, t)
    ON CONFLICT (limit_name, partition) DO UPDATE SET tat = EXCLUDED.tat
    RETURNING limit_name, partition
)
DELETE FROM {s}.flow_buckets b
WHERE b.limit_name = ANY(CAST(:names AS text[])) AND b.tat < now()
  AND NOT EXISTS (SELECT 1 FROM saved s WHERE s.limit_name = b.limit_name
                                          AND s.partition = b.partition);

-- name: operations_flow_candidates
-- Due operations of limited types, first steps (these (type, lifecycle) pairs) and later ones
-- (these (type, state) pairs), locked for the claim, with their partition under each limit
-- given (kinds and paths, in order). Operations of a blocked (type, partition kind, path,
-- value) are left out: a full partition does not crowd out the others. Two scans, each on the
-- index of its states (one OR of both would scan the table).
-- Under the flow lock (one claim of these limits at a time), clock_timestamp() only grows from
-- one claim to the next: the rate buckets see starts in the order they happen.
WITH blocked AS (
    SELECT * FROM unnest(CAST(:x_types AS text[]), CAST(:x_kinds AS text[]),
                         CAST(:x_paths AS text[]), CAST(:x_values AS text[]))
         AS x(type, kind, path, value)
), first_due AS MATERIALIZED (
    SELECT o.id, o.operation_type, o.ordering_key, o.payload, o.priority, o.run_at
    FROM {s}.operations o
    WHERE o.state IN ('pending', 'failed')
      AND o.channel = :channel
      AND o.run_at <= now()
      AND (o.operation_type, o.lifecycle) IN (
          SELECT * FROM unnest(CAST(:operation_types AS text[]), CAST(:lifecycles AS text[])))
      AND (o.ordering_key IS NULL OR NOT EXISTS (
          SELECT 1 FROM {s}.operations p
          WHERE p.ordering_key = o.ordering_key AND p.id < o.id
            AND p.state NOT IN ('succeeded', 'cancelled')))
      AND NOT EXISTS (
          SELECT 1 FROM blocked x
          WHERE x.type = o.operation_type
            AND x.value = coalesce(CASE x.kind WHEN 'ordering_key' THEN o.ordering_key
                                    WHEN 'payload' THEN o.payload #>> string_to_array(x.path, '.')
                                   END, ''))
    ORDER BY o.priority DESC, o.run_at, o.id
    LIMIT :scan
    FOR UPDATE OF o SKIP LOCKED
), step_due AS MATERIALIZED (
    SELECT o.id, o.operation_type, o.ordering_key, o.payload, o.priority, o.run_at
    FROM {s}.operations o
    -- the predicate of the operations_resting index
    WHERE o.lease_owner IS NULL
      AND o.state NOT IN ('pending', 'claimed', 'failed', 'succeeded', 'dead', 'cancelled')
      AND o.channel = :channel
      AND o.run_at <= now()
      AND (o.operation_type, o.state) IN (
          SELECT * FROM unnest(CAST(:step_types AS text[]), CAST(:step_states AS text[])))
      AND (o.ordering_key IS NULL OR NOT EXISTS (
          SELECT 1 FROM {s}.operations p
          WHERE p.ordering_key = o.ordering_key AND p.id < o.id
            AND p.state NOT IN ('succeeded', 'cancelled')))
      AND NOT EXISTS (
          SELECT 1 FROM blocked x
          WHERE x.type = o.operation_type
            AND x.value = coalesce(CASE x.kind WHEN 'ordering_key' THEN o.ordering_key
                                    WHEN 'payload' THEN o.payload #>> string_to_array(x.path, '.')
                                   END, ''))
    ORDER BY o.priority DESC, o.run_at, o.id
    LIMIT :scan
    FOR UPDATE OF o SKIP LOCKED
)
SELECT d.id, d.operation_type,
       ARRAY(SELECT coalesce(CASE k.kind WHEN 'ordering_key' THEN d.ordering_key
                              WHEN 'payload' THEN d.payload #>> string_to_array(k.path, '.')
                             END, '')
             FROM unnest(CAST(:kinds AS text[]), CAST(:paths AS text[])) WITH ORDINALITY
                  AS k(kind, path, n)
             ORDER BY k.n) AS partitions,
       -- the rates' clock: as late as possible before the claim, whose audit rows say when
       CAST(EXTRACT(epoch FROM clock_timestamp()) AS float8) AS now
FROM (SELECT * FROM first_due UNION ALL SELECT * FROM step_due) AS d
ORDER BY d.priority DESC, d.run_at, d.id;

-- name: operations_flow_claim
-- Lease these operations (chosen by the flow plan, locked by operations_flow_candidates in this
-- transaction): a first step -> claimed, a later step leased in place; rows as the other claims.
WITH claimed AS (
    UPDATE {s}.operations o
    SET state = CASE WHEN o.state IN ('pending', 'failed') THEN 'claimed' ELSE o.state END,
        transition = 'claim', transition_actor = :worker_id,
        attempts = o.attempts + 1, step_attempts = o.step_attempts + 1,
        version = o.version + 1,
        lease_owner = :worker_id,
        lease_expires_at = now() + make_interval(secs => :lease_seconds)
    WHERE o.id = ANY (CAST(:ids AS bigint[]))
    RETURNING o.id, o.operation_type, o.state, o.payload, o.attempts, o.step_attempts,
              o.max_attempts, o.version, o.idempotency_key, o.priority, o.run_at,
              o.trace_context,
              CAST(EXTRACT(epoch FROM now() - o.run_at) AS float8) AS queue_age_seconds
)
SELECT id, operation_type, state, payload, attempts, step_attempts, max_attempts, version,
       idempotency_key, trace_context, queue_age_seconds
FROM claimed
ORDER BY priority DESC, run_at, id;

-- =============================================================================================
-- anchored audit: checkpoints, verification against them, proofs, history as of an instant
-- (pgoutbox/anchor.py, docs/audit.md)
-- =============================================================================================

-- name: anchor_horizon
-- Before a checkpoint's snapshot: the earliest start of a transaction open in this database
-- now (a row it writes is recorded at or after it), whether every backend's start is visible
-- to this role, and whether a prepared transaction (start unknown) is pending.
SELECT clock_timestamp() AS now,
       (SELECT min(xact_start) FROM pg_stat_activity
        WHERE datname = current_database() AND pid <> pg_backend_pid()) AS oldest_start,
       (SELECT count(*) FROM pg_stat_activity
        WHERE datname = current_database() AND pid <> pg_backend_pid()
          AND backend_type = 'client backend' AND state IS NULL) AS hidden,
       (SELECT count(*) FROM pg_prepared_xacts WHERE database = current_database()) AS prepared,
       current_setting('track_activities') = 'on' AS tracked;

-- name: anchor_snapshot
-- Inside a checkpoint's snapshot: the database's time, name and the schema's revision.
SELECT clock_timestamp() AS taken_at, current_database() AS database,
       (SELECT revision FROM {s}.schema_revision) AS revision;

-- name: anchor_chain_rows
-- The audit log's rows in (operation_id, seq) order after a keyset position, only what a
-- checkpoint needs of each (it takes each operation's last row as its chain head).
SELECT operation_id, seq, hash
FROM {s}.audit_log
WHERE (operation_id, seq) > (:after_operation_id, :after_seq)
ORDER BY operation_id, seq
LIMIT :limit;

-- name: anchor_intents
-- The recorded intent of these operations (those still in the table).
SELECT id, operation_type, channel, lifecycle, CAST(payload AS text) AS payload,
       idempotency_key, created_by, created_at
FROM {s}.operations
WHERE id = ANY (CAST(:ids AS bigint[]));

-- name: anchor_lifecycle_versions
-- Every registered version of every custom lifecycle, oldest first.
SELECT name, version, digest, CAST(definition AS text) AS definition, registered_at
FROM {s}.lifecycles
ORDER BY name, version;

-- name: anchor_lifecycle_types
-- Which lifecycle each registered operation type runs now.
SELECT operation_type, lifecycle FROM {s}.lifecycle_types;

-- name: anchor_purges
-- Every recorded retention purge.
SELECT id, finished_before, include_dead, deleted, started_at, chained FROM {s}.purges
ORDER BY id;

-- name: anchor_audit_page
-- What verification against a checkpoint reads: audit_log_page's rows, seq 1 of each with the
-- operation row's head, state, recorded intent and lifecycle (the walk reads them there only).
SELECT a.operation_id, a.seq, a.operation_type, a.from_state, a.to_state, a.trigger, a.attempt,
       a.actor, a.db_role, a.detail, a.recorded_at, a.prev_hash, a.hash, a.intent_hash,
       o.id IS NOT NULL AS operation_exists, o.audit_seq AS head_seq, o.audit_hash AS head_hash,
       o.state AS current_state, o.lifecycle, o.channel, CAST(o.payload AS text) AS payload,
       o.idempotency_key, o.created_by, o.created_at, o.operation_type AS current_type
FROM {s}.audit_log a
LEFT JOIN {s}.operations o
    ON o.id = a.operation_id AND a.seq = 1 AND o.id >= :after_operation_id  -- see audit_log_page
WHERE (a.operation_id, a.seq) > (:after_operation_id, :after_seq) AND a.recorded_at >= :since
ORDER BY a.operation_id, a.seq
LIMIT :limit;

-- name: archive_starts_page
-- Where each archived operation's chain continues: its newest archive head (the last archived
-- row and what its publication recorded), with the operation row as anchor_audit_page gives it
-- for seq 1, in operation order after a keyset position.
SELECT DISTINCT ON (h.operation_id) h.operation_id, h.archive_id, h.seq, h.hash, h.to_state,
       h.trigger, h.attempt, h.recorded_at, h.operation_type, h.created_by AS published_by,
       h.created_at AS published_at, h.intent_hash,
       o.id IS NOT NULL AS operation_exists, o.audit_seq AS head_seq, o.audit_hash AS head_hash,
       o.state AS current_state, o.lifecycle, o.channel, CAST(o.payload AS text) AS payload,
       o.idempotency_key, o.created_by, o.created_at, o.operation_type AS current_type
FROM {s}.audit_archive_heads h
LEFT JOIN {s}.operations o ON o.id = h.operation_id
WHERE h.operation_id > :after_operation_id
ORDER BY h.operation_id, h.archive_id DESC
LIMIT :limit;

-- name: archive_start_of_operation
-- archive_starts_page for one operation (none when it was never archived).
SELECT h.operation_id, h.archive_id, h.seq, h.hash, h.to_state, h.trigger, h.attempt,
       h.recorded_at, h.operation_type, h.created_by AS published_by,
       h.created_at AS published_at, h.intent_hash,
       o.id IS NOT NULL AS operation_exists, o.audit_seq AS head_seq, o.audit_hash AS head_hash,
       o.state AS current_state
FROM {s}.audit_archive_heads h
LEFT JOIN {s}.operations o ON o.id = h.operation_id
WHERE h.operation_id = :operation_id
ORDER BY h.archive_id DESC
LIMIT 1;

-- name: archive_latest
-- The newest archive: every audit row recorded before `before` is in it or an older one.
SELECT id, before, partitions, rows, operations FROM {s}.audit_archives
ORDER BY id DESC LIMIT 1;

-- name: archive_partitions
-- audit_log's partitions by name (a month's is audit_log_yYYYYmMM, made by
-- audit_log_add_partition with that month's bounds).
SELECT c.relname AS name
FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
WHERE i.inhparent = CAST('{s}.audit_log' AS regclass)
ORDER BY c.relname;

-- name: archive_preconditions
-- Before an archive: the database's time, whether this role owns audit_log (an archive drops
-- partitions of it), and how many rows before the cut-off sit in the default partition (months
-- without a partition of their own, which an archive cannot take).
SELECT now() AS now,
       pg_has_role(current_user, (SELECT relowner FROM pg_class
                                  WHERE oid = CAST('{s}.audit_log' AS regclass)), 'USAGE') AS owner,
       (SELECT count(*) FROM {s}.audit_log_default WHERE recorded_at < :before) AS stray;

-- name: archive_export
-- The rows of one archived month, as its CSV file holds them (recorded_at_us is what the hash
-- covers); the bounds select that month's partition alone.
SELECT operation_id, seq, operation_type, from_state, to_state, trigger, attempt, actor, detail,
       recorded_at, CAST(extract(epoch FROM recorded_at) * 1000000 AS bigint) AS recorded_at_us,
       prev_hash, hash, db_role, intent_hash
FROM {s}.audit_log
WHERE recorded_at >= :month_start AND recorded_at < :month_end
ORDER BY operation_id, seq;

-- name: archive_heads_of
-- One archive's heads as the database holds them, in operation order (checked against the
-- archive's signed manifest).
SELECT operation_id, seq, hash, to_state, trigger, attempt, recorded_at, operation_type,
       created_by, created_at, intent_hash
FROM {s}.audit_archive_heads
WHERE archive_id = :archive_id
ORDER BY operation_id;

-- name: archive_record
-- Record an archive (the heads follow by COPY).
INSERT INTO {s}.audit_archives (before, partitions, rows, operations, checkpoint)
VALUES (:before, CAST(:partitions AS text[]), :rows, :operations, CAST(:checkpoint AS jsonb))
RETURNING id;

-- name: audit_log_add_partitions
-- This month's and the next months' audit_log partitions, made where missing.
SELECT {s}.audit_log_add_partitions(:months_ahead);

-- name: anchor_record_checkpoint
-- Keep a copy of a signed checkpoint (for convenience: nothing trusts it).
INSERT INTO {s}.audit_checkpoints (taken_at, size, covered_rows, root, key_id, document)
VALUES (:taken_at, :size, :covered_rows, :root, :key_id, CAST(:document AS jsonb))
RETURNING id;

-- name: anchor_latest_checkpoint
-- The newest recorded checkpoint's document (a convenience copy).
SELECT CAST(document AS text) AS document FROM {s}.audit_checkpoints
ORDER BY taken_at DESC, id DESC LIMIT 1;

-- name: anchor_operation_rows
-- One operation's audit rows up to a seq, in order (what a proof carries).
SELECT operation_id, seq, operation_type, from_state, to_state, trigger, attempt, actor, db_role,
       detail, recorded_at, prev_hash, hash, intent_hash
FROM {s}.audit_log
WHERE operation_id = :operation_id AND seq <= :seq
ORDER BY seq;

-- name: anchor_as_of
-- Each operation's newest audit row recorded at or before an instant (its state then),
-- newest operation first, before a keyset position (descending, so the primary key's index
-- is read backwards instead of sorted); `types` empty means every type.
SELECT DISTINCT ON (a.operation_id) a.operation_id, a.seq, a.operation_type, a.to_state,
       a.trigger, a.attempt, a.recorded_at
FROM {s}.audit_log a
WHERE a.operation_id < :before_operation_id AND a.recorded_at <= :at
  AND (cardinality(CAST(:types AS text[])) = 0 OR a.operation_type = ANY (CAST(:types AS text[])))
ORDER BY a.operation_id DESC, a.seq DESC
LIMIT :limit;

-- name: anchor_try_lock
-- One checkpoint at a time per schema, across workers: a session lock, released right after.
SELECT pg_try_advisory_lock(hashtext('pgoutbox.checkpoint.' || :schema));

-- name: anchor_unlock
-- Release anchor_try_lock's lock.
SELECT pg_advisory_unlock(hashtext('pgoutbox.checkpoint.' || :schema));
