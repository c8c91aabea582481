"""The daemon, in three rooms: `core` (the safety core), `services` around it, `clients` apart.

`pbmd.daemon.cli` is the `pbmd` command line; each sub-command lives with the room
it belongs to.
"""
