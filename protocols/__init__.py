"""Treatment protocols: the file format, its validation, planning, signatures, the library.

- :mod:`pbmd.protocols.model` — the TOML format as pydantic models;
- :mod:`pbmd.protocols.loader` — `load_protocol` / `parse_protocol` (all findings at once);
- :mod:`pbmd.protocols.checks`, :mod:`pbmd.protocols.limits` — dose arithmetic and ceilings;
- :mod:`pbmd.protocols.plan` — `plan(protocol, applicators, limits) -> Plan` (frozen, hashed);
- :mod:`pbmd.protocols.signing` — minisign verification;
- :mod:`pbmd.protocols.store` — `ProtocolLibrary`, the daemon's installed protocols;
- :mod:`pbmd.protocols.cli` — `pbmd protocol schema`, `pbmctl protocol validate`;
- :mod:`pbmd.protocols.library` — the shipped protocol files (TEST-signed).
"""
