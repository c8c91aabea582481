"""The safety core: everything that decides whether light is emitted, and nothing else.

Sessions and per-port runners (`session`, `runner`, `steps`, `emission`), the dose
channels and device clock (`dose`), the safety rules as data (`rules`) and the one
latched supervisor with the cause registry (`safety`), controllers as the engine
sees them (`controllers`), the engine's use cases (`engine`) and what it records
(`recording`).

It imports no service (API, records storage, MQTT, reports, configuration,
logging set-up, the process) and no client, so it can run with nothing around it
and never waits on them; `tests/test_architecture.py` keeps it so.
"""
