"""The throwaway PostgreSQL of the origin tests and benchmarks (now in the gateway package,
where the shop example finds it too)."""

from cachegw_gateway.managed_postgres import USER, ManagedPostgres, PostgresNotFound, find_bin

__all__ = ["USER", "ManagedPostgres", "PostgresNotFound", "find_bin"]
