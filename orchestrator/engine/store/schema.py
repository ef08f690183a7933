"""The journal's tables, as migrations applied in order: the embedded SQLite journal's
(``PRAGMA user_version`` counts them) and the shared PostgreSQL store's (its
``modelip_schema`` table does). A migration is never edited once released: a
change is a new one. Both stores read a card's row with the same columns."""

from __future__ import annotations

# Applied in order; PRAGMA user_version says how many a journal has had.
SQLITE_MIGRATIONS = (
    """
    CREATE TABLE IF NOT EXISTS cards (
        host TEXT NOT NULL, device INTEGER NOT NULL, card_id TEXT NOT NULL DEFAULT '',
        grp INTEGER NOT NULL, partition INTEGER NOT NULL, state TEXT NOT NULL,
        boot_counter INTEGER NOT NULL DEFAULT 0, session_id TEXT NOT NULL DEFAULT '',
        program_id TEXT NOT NULL DEFAULT '', attempts INTEGER NOT NULL DEFAULT 0,
        reason TEXT NOT NULL DEFAULT '', updated REAL NOT NULL,
        PRIMARY KEY (host, device));
    CREATE TABLE IF NOT EXISTS transitions (
        id INTEGER PRIMARY KEY, ts REAL NOT NULL, host TEXT NOT NULL, device INTEGER NOT NULL,
        card_id TEXT NOT NULL, from_state TEXT NOT NULL, to_state TEXT NOT NULL,
        boot_counter INTEGER NOT NULL, session_id TEXT NOT NULL, reason TEXT NOT NULL);
    CREATE TABLE IF NOT EXISTS loads (
        id INTEGER PRIMARY KEY, ts REAL NOT NULL, host TEXT NOT NULL, device INTEGER NOT NULL,
        card_id TEXT NOT NULL, session_id TEXT NOT NULL, program_id TEXT NOT NULL,
        partition INTEGER NOT NULL, outcome TEXT NOT NULL DEFAULT 'sent');
    CREATE TABLE IF NOT EXISTS stages (
        host TEXT NOT NULL, program_id TEXT NOT NULL, ts REAL NOT NULL,
        PRIMARY KEY (host, program_id));
    """,
    """
    ALTER TABLE cards ADD COLUMN good_card_id TEXT NOT NULL DEFAULT '';
    ALTER TABLE cards ADD COLUMN good_session TEXT NOT NULL DEFAULT '';
    ALTER TABLE cards ADD COLUMN good_program TEXT NOT NULL DEFAULT '';
    ALTER TABLE cards ADD COLUMN good_partition INTEGER NOT NULL DEFAULT -1;
    CREATE TABLE hosts (
        host TEXT PRIMARY KEY, address TEXT NOT NULL, state TEXT NOT NULL,
        reason TEXT NOT NULL, updated REAL NOT NULL);
    CREATE TABLE host_transitions (
        id INTEGER PRIMARY KEY, ts REAL NOT NULL, host TEXT NOT NULL,
        from_state TEXT NOT NULL, to_state TEXT NOT NULL, reason TEXT NOT NULL);
    CREATE INDEX loads_by_card ON loads (host, device, id);
    """,
    """
    CREATE TABLE unseals (
        id INTEGER PRIMARY KEY, ts REAL NOT NULL, replica TEXT NOT NULL,
        token TEXT NOT NULL, kek TEXT NOT NULL, blob TEXT NOT NULL);
    """,
    """
    CREATE INDEX transitions_by_card ON transitions (host, device, id);
    """,
    # A move is one row: the history row carries the card's whole new state and a
    # trigger applies it to the card's current row, in the same statement (atomic).
    (
        "ALTER TABLE transitions ADD COLUMN program_id TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE transitions ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE transitions ADD COLUMN good_card_id TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE transitions ADD COLUMN good_session TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE transitions ADD COLUMN good_program TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE transitions ADD COLUMN good_partition INTEGER NOT NULL DEFAULT -1",
        """CREATE TRIGGER transitions_move_card AFTER INSERT ON transitions BEGIN
            UPDATE cards SET card_id = NEW.card_id, state = NEW.to_state,
                boot_counter = NEW.boot_counter, session_id = NEW.session_id,
                program_id = NEW.program_id, attempts = NEW.attempts, reason = NEW.reason,
                updated = NEW.ts, good_card_id = NEW.good_card_id,
                good_session = NEW.good_session, good_program = NEW.good_program,
                good_partition = NEW.good_partition
            WHERE host = NEW.host AND device = NEW.device;
        END""",
    ),
    # Rollouts (engine/rollout/): the programs a fleet served, which one it
    # serves now, each rollout with its waves' history.
    """
    CREATE TABLE programs (
        program_id TEXT PRIMARY KEY, model_id TEXT NOT NULL, version INTEGER NOT NULL,
        floor INTEGER NOT NULL, body TEXT NOT NULL, ts REAL NOT NULL);
    CREATE TABLE fleet_program (
        id INTEGER PRIMARY KEY CHECK (id = 1), program_id TEXT NOT NULL, ts REAL NOT NULL);
    CREATE TABLE rollouts (
        id INTEGER PRIMARY KEY, started REAL NOT NULL, updated REAL NOT NULL, ended REAL,
        from_program TEXT NOT NULL, candidate TEXT NOT NULL, to_program TEXT NOT NULL,
        waves TEXT NOT NULL, wave INTEGER NOT NULL, phase TEXT NOT NULL,
        paused INTEGER NOT NULL DEFAULT 0, undo INTEGER NOT NULL DEFAULT 0,
        verdict TEXT NOT NULL DEFAULT '');
    CREATE TABLE rollout_history (
        id INTEGER PRIMARY KEY, rollout INTEGER NOT NULL, ts REAL NOT NULL,
        wave INTEGER NOT NULL, phase TEXT NOT NULL, what TEXT NOT NULL);
    """,
    # Revisions (docs/api.md): every journaled change gets the next revision, with the
    # state of its object at that revision, written by the statement that journals it.
    (
        """CREATE TABLE changes (
            revision INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL NOT NULL,
            kind TEXT NOT NULL, body TEXT NOT NULL)""",
        """CREATE TRIGGER transitions_change AFTER INSERT ON transitions BEGIN
            INSERT INTO changes (ts, kind, body) VALUES (NEW.ts, 'card', json_object(
                'host', NEW.host, 'device', NEW.device, 'card_id', NEW.card_id,
                'state', NEW.to_state, 'previous', NEW.from_state,
                'boot_counter', NEW.boot_counter, 'session_id', NEW.session_id,
                'program_id', NEW.program_id, 'reason', NEW.reason,
                'attempts', NEW.attempts));
        END""",
        """CREATE TRIGGER host_transitions_change AFTER INSERT ON host_transitions BEGIN
            INSERT INTO changes (ts, kind, body) VALUES (NEW.ts, 'host', json_object(
                'host', NEW.host, 'state', NEW.to_state, 'previous', NEW.from_state,
                'reason', NEW.reason));
        END""",
        """CREATE TRIGGER rollout_history_change AFTER INSERT ON rollout_history BEGIN
            INSERT INTO changes (ts, kind, body) VALUES (NEW.ts, 'rollout', json_object(
                'rollout', NEW.rollout, 'wave', NEW.wave, 'phase', NEW.phase,
                'what', NEW.what));
        END""",
    ),
    # Commands through the control API (docs/api.md), allowed or refused, with who asked.
    (
        """CREATE TABLE commands (
            id INTEGER PRIMARY KEY, ts REAL NOT NULL, who TEXT NOT NULL, role TEXT NOT NULL,
            command TEXT NOT NULL, outcome TEXT NOT NULL)""",
        """CREATE TRIGGER commands_change AFTER INSERT ON commands BEGIN
            INSERT INTO changes (ts, kind, body) VALUES (NEW.ts, 'command', json_object(
                'who', NEW.who, 'role', NEW.role, 'command', NEW.command,
                'outcome', NEW.outcome));
        END""",
    ),
    # Rollout steps an operator approves (docs/rollouts.md "Approvals"): the waves that
    # wait for one, and the last wave approved.
    (
        "ALTER TABLE rollouts ADD COLUMN manual TEXT NOT NULL DEFAULT '[]'",
        "ALTER TABLE rollouts ADD COLUMN approved INTEGER NOT NULL DEFAULT -1",
    ),
    # Cordoned hosts (docs/api.md "Cordon"): an operator's word, kept for every replica
    # and the next run; a host's change carries who cordoned it.
    (
        """CREATE TABLE cordons (
            host TEXT PRIMARY KEY, who TEXT NOT NULL, ts REAL NOT NULL)""",
        "DROP TRIGGER host_transitions_change",
        """CREATE TRIGGER host_transitions_change AFTER INSERT ON host_transitions BEGIN
            INSERT INTO changes (ts, kind, body) VALUES (NEW.ts, 'host', json_object(
                'host', NEW.host, 'state', NEW.to_state, 'previous', NEW.from_state,
                'reason', NEW.reason, 'cordoned_by',
                coalesce((SELECT who FROM cordons WHERE host = NEW.host), '')));
        END""",
        """CREATE TRIGGER cordons_cordon AFTER INSERT ON cordons BEGIN
            INSERT INTO changes (ts, kind, body) SELECT NEW.ts, 'host', json_object(
                'host', NEW.host, 'state', coalesce(h.state, 'CONNECTING'), 'previous', '',
                'reason', 'cordoned by ' || NEW.who, 'cordoned_by', NEW.who)
            FROM (SELECT 1) LEFT JOIN hosts h ON h.host = NEW.host;
        END""",
        """CREATE TRIGGER cordons_uncordon AFTER DELETE ON cordons BEGIN
            INSERT INTO changes (ts, kind, body) SELECT
                (julianday('now') - 2440587.5) * 86400.0, 'host', json_object(
                'host', OLD.host, 'state', coalesce(h.state, 'CONNECTING'), 'previous', '',
                'reason', 'uncordoned', 'cordoned_by', '')
            FROM (SELECT 1) LEFT JOIN hosts h ON h.host = OLD.host;
        END""",
    ),
    # Where each deployment's MDP groups are placed (docs/deployments.md): kept, so that
    # what is placed stays where it is from one run to the next.
    """
    CREATE TABLE placements (
        host TEXT NOT NULL, devices TEXT NOT NULL, deployment TEXT NOT NULL,
        ts REAL NOT NULL, PRIMARY KEY (host, devices));
    """,
    # The fleet's identity, sent to hosts with every call (docs/protocol.md "Claims").
    """
    CREATE TABLE identity (id INTEGER PRIMARY KEY CHECK (id = 1), fleet TEXT NOT NULL,
                           ts REAL NOT NULL);
    """,
    # The deployments a running fleet serves, as their plan said, and the changed plans
    # `modelip apply` hands to a running watch (docs/deployments.md "Applying").
    """
    CREATE TABLE deployments (name TEXT PRIMARY KEY, spec TEXT NOT NULL, ts REAL NOT NULL);
    CREATE TABLE applies (
        id INTEGER PRIMARY KEY, ts REAL NOT NULL, plan TEXT NOT NULL, digest TEXT NOT NULL,
        who TEXT NOT NULL, state TEXT NOT NULL DEFAULT 'requested',
        said TEXT NOT NULL DEFAULT '', done REAL);
    """,
    # A rollout per deployment (docs/deployments.md "Rollouts"): each deployment's
    # program and its rollouts ('' : the fleet's one model); a rollout's change names it.
    (
        "ALTER TABLE rollouts ADD COLUMN deployment TEXT NOT NULL DEFAULT ''",
        """CREATE TABLE deployment_programs (
            deployment TEXT PRIMARY KEY, program_id TEXT NOT NULL, ts REAL NOT NULL)""",
        "DROP TRIGGER rollout_history_change",
        """CREATE TRIGGER rollout_history_change AFTER INSERT ON rollout_history BEGIN
            INSERT INTO changes (ts, kind, body) VALUES (NEW.ts, 'rollout', json_object(
                'rollout', NEW.rollout, 'wave', NEW.wave, 'phase', NEW.phase,
                'what', NEW.what, 'deployment', coalesce(
                    (SELECT deployment FROM rollouts WHERE id = NEW.rollout), '')));
        END""",
    ),
)


# Applied in order under an advisory lock; modelip_schema says how many a database
# has had.
POSTGRES_MIGRATIONS = (
    """
    CREATE TABLE cards (
        host TEXT NOT NULL, device INTEGER NOT NULL, card_id TEXT NOT NULL DEFAULT '',
        grp INTEGER NOT NULL, partition INTEGER NOT NULL, state TEXT NOT NULL,
        boot_counter BIGINT NOT NULL DEFAULT 0, session_id TEXT NOT NULL DEFAULT '',
        program_id TEXT NOT NULL DEFAULT '', attempts INTEGER NOT NULL DEFAULT 0,
        reason TEXT NOT NULL DEFAULT '', updated DOUBLE PRECISION NOT NULL,
        good_card_id TEXT NOT NULL DEFAULT '', good_session TEXT NOT NULL DEFAULT '',
        good_program TEXT NOT NULL DEFAULT '', good_partition INTEGER NOT NULL DEFAULT -1,
        replica TEXT NOT NULL DEFAULT '',
        PRIMARY KEY (host, device));
    CREATE TABLE transitions (
        id BIGSERIAL PRIMARY KEY, ts DOUBLE PRECISION NOT NULL, host TEXT NOT NULL,
        device INTEGER NOT NULL, card_id TEXT NOT NULL, from_state TEXT NOT NULL,
        to_state TEXT NOT NULL, boot_counter BIGINT NOT NULL, session_id TEXT NOT NULL,
        reason TEXT NOT NULL, replica TEXT NOT NULL, epoch BIGINT NOT NULL);
    CREATE INDEX transitions_by_card ON transitions (host, device, id);
    CREATE TABLE loads (
        id BIGSERIAL PRIMARY KEY, ts DOUBLE PRECISION NOT NULL, host TEXT NOT NULL,
        device INTEGER NOT NULL, card_id TEXT NOT NULL, session_id TEXT NOT NULL,
        program_id TEXT NOT NULL, partition INTEGER NOT NULL,
        outcome TEXT NOT NULL DEFAULT 'sent', replica TEXT NOT NULL, epoch BIGINT NOT NULL);
    CREATE INDEX loads_by_card ON loads (host, device, id);
    CREATE TABLE stages (
        host TEXT NOT NULL, program_id TEXT NOT NULL, ts DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (host, program_id));
    CREATE TABLE hosts (
        host TEXT PRIMARY KEY, address TEXT NOT NULL, state TEXT NOT NULL,
        reason TEXT NOT NULL, updated DOUBLE PRECISION NOT NULL, replica TEXT NOT NULL);
    CREATE TABLE host_transitions (
        id BIGSERIAL PRIMARY KEY, ts DOUBLE PRECISION NOT NULL, host TEXT NOT NULL,
        from_state TEXT NOT NULL, to_state TEXT NOT NULL, reason TEXT NOT NULL,
        replica TEXT NOT NULL);
    CREATE TABLE unseals (
        id BIGSERIAL PRIMARY KEY, ts DOUBLE PRECISION NOT NULL, replica TEXT NOT NULL,
        token TEXT NOT NULL, kek TEXT NOT NULL, blob TEXT NOT NULL);
    CREATE TABLE leases (
        host TEXT PRIMARY KEY, owner TEXT NOT NULL DEFAULT '',
        epoch BIGINT NOT NULL DEFAULT 0,
        expires TIMESTAMPTZ NOT NULL DEFAULT '-infinity');
    CREATE TABLE replicas (
        name TEXT PRIMARY KEY, instance TEXT NOT NULL, started TIMESTAMPTZ NOT NULL,
        heartbeat TIMESTAMPTZ NOT NULL, stopped BOOLEAN NOT NULL DEFAULT false);
    CREATE TABLE seals (
        source_key TEXT PRIMARY KEY, salt BYTEA NOT NULL, program_id TEXT NOT NULL,
        replica TEXT NOT NULL, ts DOUBLE PRECISION NOT NULL);
    """,
    # One fleet per store (docs/replicas.md): what every replica's plan must agree on.
    """
    CREATE TABLE fleet (
        id INTEGER PRIMARY KEY CHECK (id = 1), digest TEXT NOT NULL, what TEXT NOT NULL,
        replica TEXT NOT NULL, ts DOUBLE PRECISION NOT NULL);
    """,
    # Revisions (docs/api.md). Replicas write at once: a change takes a transaction-wide
    # advisory lock first, so revisions commit in their order and a watcher reading
    # "after N" never misses one committed later with a smaller number. A card's
    # program and attempts come from its row, which record_card updates first.
    (
        """CREATE TABLE changes (
        revision BIGSERIAL PRIMARY KEY, ts DOUBLE PRECISION NOT NULL, kind TEXT NOT NULL,
        body TEXT NOT NULL)""",
        """CREATE FUNCTION modelip_change() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        PERFORM pg_advisory_xact_lock(7302458);
        IF TG_TABLE_NAME = 'transitions' THEN
            INSERT INTO changes (ts, kind, body) SELECT NEW.ts, 'card', json_build_object(
                'host', NEW.host, 'device', NEW.device, 'card_id', NEW.card_id,
                'state', NEW.to_state, 'previous', NEW.from_state,
                'boot_counter', NEW.boot_counter, 'session_id', NEW.session_id,
                'program_id', c.program_id, 'reason', NEW.reason,
                'attempts', c.attempts)::text
            FROM cards c WHERE c.host = NEW.host AND c.device = NEW.device;
        ELSE
            INSERT INTO changes (ts, kind, body) VALUES (NEW.ts, 'host', json_build_object(
                'host', NEW.host, 'state', NEW.to_state, 'previous', NEW.from_state,
                'reason', NEW.reason)::text);
        END IF;
        RETURN NULL;
    END $$""",
        """CREATE TRIGGER transitions_change AFTER INSERT ON transitions
        FOR EACH ROW EXECUTE FUNCTION modelip_change()""",
        """CREATE TRIGGER host_transitions_change AFTER INSERT ON host_transitions
        FOR EACH ROW EXECUTE FUNCTION modelip_change()""",
    ),
    # Commands through the control API (docs/api.md), allowed or refused, with who asked.
    (
        """CREATE TABLE commands (
            id BIGSERIAL PRIMARY KEY, ts DOUBLE PRECISION NOT NULL, who TEXT NOT NULL,
            role TEXT NOT NULL, command TEXT NOT NULL, outcome TEXT NOT NULL)""",
        """CREATE FUNCTION modelip_command_change() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM pg_advisory_xact_lock(7302458);
            INSERT INTO changes (ts, kind, body) VALUES (NEW.ts, 'command', json_build_object(
                'who', NEW.who, 'role', NEW.role, 'command', NEW.command,
                'outcome', NEW.outcome)::text);
            RETURN NULL;
        END $$""",
        """CREATE TRIGGER commands_change AFTER INSERT ON commands
            FOR EACH ROW EXECUTE FUNCTION modelip_command_change()""",
    ),
    # Cordoned hosts (docs/api.md "Cordon"), as in the embedded journal.
    (
        """CREATE TABLE cordons (
            host TEXT PRIMARY KEY, who TEXT NOT NULL, ts DOUBLE PRECISION NOT NULL)""",
        """CREATE OR REPLACE FUNCTION modelip_change() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        PERFORM pg_advisory_xact_lock(7302458);
        IF TG_TABLE_NAME = 'transitions' THEN
            INSERT INTO changes (ts, kind, body) SELECT NEW.ts, 'card', json_build_object(
                'host', NEW.host, 'device', NEW.device, 'card_id', NEW.card_id,
                'state', NEW.to_state, 'previous', NEW.from_state,
                'boot_counter', NEW.boot_counter, 'session_id', NEW.session_id,
                'program_id', c.program_id, 'reason', NEW.reason,
                'attempts', c.attempts)::text
            FROM cards c WHERE c.host = NEW.host AND c.device = NEW.device;
        ELSE
            INSERT INTO changes (ts, kind, body) VALUES (NEW.ts, 'host', json_build_object(
                'host', NEW.host, 'state', NEW.to_state, 'previous', NEW.from_state,
                'reason', NEW.reason, 'cordoned_by',
                coalesce((SELECT who FROM cordons WHERE host = NEW.host), ''))::text);
        END IF;
        RETURN NULL;
    END $$""",
        """CREATE FUNCTION modelip_cordon_change() RETURNS trigger LANGUAGE plpgsql AS $$
    DECLARE
        subject cordons%ROWTYPE;
    BEGIN
        PERFORM pg_advisory_xact_lock(7302458);
        IF TG_OP = 'INSERT' THEN subject := NEW; ELSE subject := OLD; END IF;
        INSERT INTO changes (ts, kind, body) VALUES (
            extract(epoch FROM clock_timestamp()), 'host', json_build_object(
            'host', subject.host,
            'state', coalesce((SELECT state FROM hosts WHERE host = subject.host),
                              'CONNECTING'),
            'previous', '',
            'reason', CASE WHEN TG_OP = 'INSERT' THEN 'cordoned by ' || subject.who
                      ELSE 'uncordoned' END,
            'cordoned_by', CASE WHEN TG_OP = 'INSERT' THEN subject.who ELSE '' END)::text);
        RETURN NULL;
    END $$""",
        """CREATE TRIGGER cordons_change AFTER INSERT OR DELETE ON cordons
            FOR EACH ROW EXECUTE FUNCTION modelip_cordon_change()""",
    ),
    # Rollouts with a shared store (docs/replicas.md "Rollouts"): as the embedded
    # journal's, with each replica's path to a program's body, the groups' targets the
    # leader set, and at most one rollout in progress.
    (
        """CREATE TABLE programs (
            program_id TEXT PRIMARY KEY, model_id TEXT NOT NULL, version BIGINT NOT NULL,
            floor BIGINT NOT NULL, ts DOUBLE PRECISION NOT NULL)""",
        """CREATE TABLE program_bodies (
            program_id TEXT NOT NULL, replica TEXT NOT NULL, body TEXT NOT NULL,
            PRIMARY KEY (program_id, replica))""",
        """CREATE TABLE fleet_program (
            id INTEGER PRIMARY KEY CHECK (id = 1), program_id TEXT NOT NULL,
            ts DOUBLE PRECISION NOT NULL)""",
        """CREATE TABLE rollouts (
            id BIGSERIAL PRIMARY KEY, started DOUBLE PRECISION NOT NULL,
            updated DOUBLE PRECISION NOT NULL, ended DOUBLE PRECISION,
            from_program TEXT NOT NULL, candidate TEXT NOT NULL, to_program TEXT NOT NULL,
            waves TEXT NOT NULL, wave INTEGER NOT NULL, phase TEXT NOT NULL,
            paused BOOLEAN NOT NULL DEFAULT false, undo BOOLEAN NOT NULL DEFAULT false,
            verdict TEXT NOT NULL DEFAULT '', manual TEXT NOT NULL DEFAULT '[]',
            approved INTEGER NOT NULL DEFAULT -1)""",
        "CREATE UNIQUE INDEX one_rollout_in_progress ON rollouts ((true)) WHERE ended IS NULL",
        """CREATE TABLE rollout_history (
            id BIGSERIAL PRIMARY KEY, rollout BIGINT NOT NULL, ts DOUBLE PRECISION NOT NULL,
            wave INTEGER NOT NULL, phase TEXT NOT NULL, what TEXT NOT NULL,
            replica TEXT NOT NULL DEFAULT '')""",
        # every target a leader set (the newest per group counts): who, under which epoch
        """CREATE TABLE group_targets (
            id BIGSERIAL PRIMARY KEY, grp INTEGER NOT NULL, program_id TEXT NOT NULL,
            rollout BIGINT NOT NULL, replica TEXT NOT NULL, epoch BIGINT NOT NULL,
            ts DOUBLE PRECISION NOT NULL)""",
        "CREATE INDEX group_targets_by_group ON group_targets (rollout, grp, id)",
        """CREATE FUNCTION modelip_rollout_change() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM pg_advisory_xact_lock(7302458);
            INSERT INTO changes (ts, kind, body) VALUES (NEW.ts, 'rollout', json_build_object(
                'rollout', NEW.rollout, 'wave', NEW.wave, 'phase', NEW.phase,
                'what', NEW.what)::text);
            RETURN NULL;
        END $$""",
        """CREATE TRIGGER rollout_history_change AFTER INSERT ON rollout_history
            FOR EACH ROW EXECUTE FUNCTION modelip_rollout_change()""",
    ),
    # The fleet's identity, one for every replica (docs/protocol.md "Claims").
    """CREATE TABLE identity (id INTEGER PRIMARY KEY CHECK (id = 1), fleet TEXT NOT NULL,
        ts DOUBLE PRECISION NOT NULL)""",
    # Where each deployment's groups are placed (docs/deployments.md), for every replica.
    """CREATE TABLE placements (
        host TEXT NOT NULL, devices TEXT NOT NULL, deployment TEXT NOT NULL,
        ts DOUBLE PRECISION NOT NULL, PRIMARY KEY (host, devices))""",
    # A rollout per deployment (docs/deployments.md "Rollouts"): each deployment's
    # program, its rollouts (at most one in progress per deployment), each change
    # naming its deployment.
    (
        "ALTER TABLE rollouts ADD COLUMN deployment TEXT NOT NULL DEFAULT ''",
        "DROP INDEX one_rollout_in_progress",
        "CREATE UNIQUE INDEX one_rollout_in_progress ON rollouts (deployment) "
        "WHERE ended IS NULL",
        """CREATE TABLE deployment_programs (
            deployment TEXT PRIMARY KEY, program_id TEXT NOT NULL,
            ts DOUBLE PRECISION NOT NULL)""",
        """CREATE OR REPLACE FUNCTION modelip_rollout_change() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM pg_advisory_xact_lock(7302458);
            INSERT INTO changes (ts, kind, body) VALUES (NEW.ts, 'rollout', json_build_object(
                'rollout', NEW.rollout, 'wave', NEW.wave, 'phase', NEW.phase,
                'what', NEW.what, 'deployment', coalesce(
                    (SELECT deployment FROM rollouts WHERE id = NEW.rollout), ''))::text);
            RETURN NULL;
        END $$""",
    ),
)


CARD_COLUMNS = ("host, device, card_id, grp, partition, state, boot_counter, session_id, "
                 "program_id, attempts, reason, updated, good_card_id, good_session, "
                 "good_program, good_partition")
