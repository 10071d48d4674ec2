"""Results: atomic files, long-format records and manifests, aggregation, tables and figures."""
