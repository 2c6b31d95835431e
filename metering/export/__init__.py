"""Moving the ledger out of Redis into a durable sink, exactly once: the exporter (`exporter`),
the sinks it writes to (`postgres`, `jsonl`, `http`) and the journal of the last batch written
(`journal`)."""
