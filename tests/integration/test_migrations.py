from sqlalchemy import inspect

from shared.models import metadata


async def test_migrations_create_every_table_and_index_of_the_model(engine):
    async with engine.connect() as conn:
        tables, indexes = await conn.run_sync(
            lambda c: (
                set(inspect(c).get_table_names()),
                {t: {i["name"] for i in inspect(c).get_indexes(t)} for t in metadata.tables},
            )
        )
    assert set(metadata.tables) <= tables
    for name, table in metadata.tables.items():
        expected = {i.name for i in table.indexes}
        assert expected <= indexes[name], f"{name} misses {expected - indexes[name]}"
