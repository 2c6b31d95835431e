"""The bench programs, one package each (`python -m bench.<program>`): `gateway` (what capgate
costs next to a direct connection, an nginx hop and LiteLLM), `added` (the latency it adds to the real vLLM,
request by request), `trilemma` (granularity, real-time cost and optimality per lease size), `accounts`,
`ledger`, `soak` and `headroom`; `common` holds what several of them share."""
