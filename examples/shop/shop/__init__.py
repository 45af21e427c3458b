"""The cachegw shop example: a catalog API on PostgreSQL, served without a cache, with a
redis-py cache-aside layer, or through cachegw (README.md beside this package)."""
