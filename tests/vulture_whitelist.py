"""Names `vulture` cannot see used, each with who uses it; everything else it reports is dead code.

`python -m vulture` reads this file with the code (`[tool.vulture]` in pyproject.toml); the test
`tests/unit/test_dead_code.py` fails when vulture reports anything.
"""

# Called by the frameworks: asyncio protocols, httptools' parser callbacks, http.server handlers,
# pydantic validators and configuration, FastAPI routes and handlers, uvicorn's app factory, pytest.
_.connection_made  # asyncio.Protocol
_.data_received  # asyncio.Protocol
_.on_status  # httptools.HttpResponseParser
_.on_header  # httptools.HttpResponseParser
_.on_headers_complete  # httptools.HttpResponseParser
_.on_body  # httptools.HttpResponseParser
_.on_message_complete  # httptools.HttpResponseParser
_.do_POST  # http.server.BaseHTTPRequestHandler
_.log_message  # http.server.BaseHTTPRequestHandler
model_config  # pydantic
_._caps_something  # pydantic model_validator
_._distinct_thresholds  # pydantic field_validator
_._readable  # pydantic field_validator
_._one_source  # pydantic model_validator
_._printable  # pydantic field_validator
_._shard_in_range  # pydantic model_validator
api_error  # FastAPI exception handler
no_route  # FastAPI exception handler
readyz  # FastAPI route
metrics_page  # FastAPI route
own_usage  # FastAPI route
app_from_environment  # uvicorn's factory, named by proxy/cli.py as a string
pytest_configure  # pytest hook
pytestmark  # pytest marks

# The parameters of __exit__, which the context-manager protocol passes.
exc_type
exc_info
tb
traceback

# Fields written out whole (asdict, vars, JSON) and read back by name or by their reader.
duration_ms  # metering.events.UsageEvent: a ledger field
resets_in_s  # metering.usage.WindowUsage: the usage endpoint's JSON
wall_s  # bench.gateway.load.LoadResult: read by bench.gateway.runner from the JSON it prints
top_shed  # bench.headroom Row: headroom.json
at_s  # bench.ledger Sample: ledger.json
tokens_over_hard_cap  # bench.soak.run.Report: soak.json and the audit's printout
usage_events_lost
rows_twice
generated_twice
hostile_not_refused
server_errors_outside_faults
server_errors_outside_faults_by_status
users_unbalanced
leased_over_cap
rows_without_client_id


# MkDocs calls the hooks of docs/hooks/ by name.
on_pre_build
on_page_markdown
on_post_build
