"""The clients: `pbmctl`, its socket client and views, and the demo.

They talk to a running daemon over its control socket only (JSON-RPC), as any
other client would; the one thing they read of the daemon's own code is its
configuration file's format, to find the socket.
"""
