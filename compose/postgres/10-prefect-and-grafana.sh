#!/bin/sh
# Runs once, when the postgres volume is first initialised (docker-entrypoint-initdb.d).
# Creates the Prefect server's own database (it needs pg_trgm) so the stack runs one
# PostgreSQL, a read-only role for Grafana and the exporter so dashboards can never change
# data, and the writer role the flows store rows as (no DDL: only the owner migrates).
set -eu

: "${PREFECT_DB_PASSWORD:?PREFECT_DB_PASSWORD must be set}"
: "${GRAFANA_PG_PASSWORD:?GRAFANA_PG_PASSWORD must be set}"
: "${PG_WRITER_PASSWORD:?PG_WRITER_PASSWORD must be set}"

psql --no-psqlrc --set ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
    --set prefect_password="$PREFECT_DB_PASSWORD" \
    --set grafana_password="$GRAFANA_PG_PASSWORD" \
    --set writer_password="$PG_WRITER_PASSWORD" \
    --set app_db="$POSTGRES_DB" \
    --set app_user="$POSTGRES_USER" <<'SQL'
CREATE ROLE prefect LOGIN PASSWORD :'prefect_password';
CREATE DATABASE prefect OWNER prefect;

CREATE ROLE grafana_reader LOGIN PASSWORD :'grafana_password';
GRANT CONNECT ON DATABASE :"app_db" TO grafana_reader;
GRANT USAGE ON SCHEMA public TO grafana_reader;
ALTER DEFAULT PRIVILEGES FOR ROLE :"app_user" IN SCHEMA public
    GRANT SELECT ON TABLES TO grafana_reader;

CREATE ROLE tapeline_writer LOGIN PASSWORD :'writer_password';
GRANT CONNECT ON DATABASE :"app_db" TO tapeline_writer;
GRANT USAGE ON SCHEMA public TO tapeline_writer;
ALTER DEFAULT PRIVILEGES FOR ROLE :"app_user"
    GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO tapeline_writer;
ALTER DEFAULT PRIVILEGES FOR ROLE :"app_user"
    GRANT USAGE, SELECT, UPDATE ON SEQUENCES TO tapeline_writer;
SQL

psql --no-psqlrc --set ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname prefect <<'SQL'
CREATE EXTENSION IF NOT EXISTS pg_trgm;
SQL
