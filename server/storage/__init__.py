"""The database: `Store` (SQLite or PostgreSQL behind one `Executor`), the SQLite writer,
the migrations and their runner. Imports domain and infra only."""
