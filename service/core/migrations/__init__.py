"""The study store's schema, as Alembic migrations (``versions/``), run by
:meth:`service.core.store.StudyStore.migrate` (``create_all`` is an alias) at API start, at
``bonn-sweep keys create`` and whenever a store is opened for writing.

* ``0001``: the schema before migrations existed (``studies``, ``api_keys``). A database made by that
  code has these tables but no ``alembic_version``: it is stamped ``0001`` and upgraded from there.
* ``0002``: ``studies.api_key_id`` (which API key created a study), ``rate_buckets`` (per-key token
  buckets shared by every API process) and ``store_locks`` (one row that serialises the active-study
  count and the insert across processes).

New revision: a file ``versions/NNNN_what.py`` with ``revision = "NNNN"``, ``down_revision`` the
previous one, and ``upgrade()``; ``tests/unit/test_migrations.py`` upgrades a database made by the
previous schema.
"""
