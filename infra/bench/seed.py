"""Rows for the list benchmarks, written straight into the bench's database with generate_series.

Shaped like real rows: 70% `success` (each with its image row), 20% `failed`, 10% `cancelled`, one a
second going back in time, so `status=success` pages and deep cursors hit realistic data.
"""

from __future__ import annotations

import psycopg

_SEED = """
CREATE TEMP TABLE seed ON COMMIT DROP AS
SELECT i,
       gen_random_uuid() AS generation_id,
       gen_random_uuid() AS image_id,
       now() - interval '1 hour' - make_interval(secs => i) AS at,
       CASE WHEN i %% 10 < 7 THEN 'success' WHEN i %% 10 < 9 THEN 'failed' ELSE 'cancelled' END AS status
FROM generate_series(%(first)s::bigint, %(last)s::bigint) AS i;

INSERT INTO images (id, project_id, generation_id, source, storage_key, thumb_sm_key, thumb_lg_key,
                    mime_type, width, height, file_size, public_token, meta, created_at)
SELECT image_id, %(project)s, generation_id, 'generated',
       'seed/' || i || '/original.png', 'seed/' || i || '/thumb-sm.webp', 'seed/' || i || '/thumb-lg.webp',
       'image/png', 1024, 1024, 150000, 'seed-' || i || '-' || md5(image_id::text),
       '{"provider": "placeholder"}'::jsonb, at
FROM seed WHERE status = 'success';

INSERT INTO generations (id, project_id, prompt, original_prompt, auto_enhance, aspect_ratio, status,
                         provider, parameters, meta, output_image_id, processing_time_ms, retry_count,
                         attempts, version, error_code, error_message, deadline_at, enqueued_at,
                         started_at, completed_at, created_at, updated_at)
SELECT generation_id, %(project)s, 'seeded prompt ' || i, 'seeded prompt ' || i, false, '1:1', status,
       'placeholder', '{}'::jsonb, '{}'::jsonb,
       CASE WHEN status = 'success' THEN image_id END,
       CASE WHEN status = 'success' THEN 40 + i %% 50 END, 0, 1, 1,
       CASE WHEN status = 'failed' THEN 'PROVIDER_ERROR' END,
       CASE WHEN status = 'failed' THEN 'seeded failure' END,
       at + interval '1 hour', at, at, at + interval '50 milliseconds', at, at
FROM seed;
"""


def seed_rows(database_url: str, project_id: str, first: int, last: int) -> None:
    """Rows numbered first..last (inclusive) into the project; ANALYZE so plans match a live system."""
    with psycopg.connect(database_url) as conn:
        params = {"project": project_id, "first": first, "last": last}
        for statement in _SEED.split(";\n\n"):  # one statement per execute: parameters need it
            conn.execute(statement, params)
        conn.commit()
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("ANALYZE generations")
        conn.execute("ANALYZE images")


def deep_row(database_url: str, project_id: str, status: str, depth: int) -> tuple[object, object]:
    """(created_at, id) of the `status` row `depth` rows from the newest: where a deep cursor points."""
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT created_at, id FROM generations WHERE project_id = %s AND status = %s"
            " AND deleted_at IS NULL ORDER BY created_at DESC, id DESC OFFSET %s LIMIT 1",
            (project_id, status, depth),
        ).fetchone()
    if row is None:
        raise RuntimeError(f"no {status} row at depth {depth}")
    return row[0], row[1]
