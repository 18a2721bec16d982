-- Runs once, when the postgres image initialises an empty data volume (as POSTGRES_USER).
-- The basic-auth app keeps its users and permissions in their own database
-- (docker/auth/basic_auth.ini), apart from the tracking data in POSTGRES_DB.
CREATE DATABASE mlflow_auth;
