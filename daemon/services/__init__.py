"""The services around the safety core: what the core needs from the world and what
the world needs from it — the control API, the records store, MQTT, reports,
configuration, logging and the process (`service`) that starts them in order.

Services may use the core; the core never calls a service except through the
narrow typed interfaces it defines (`pbmd.daemon.core.recording.RecordSink`,
listeners), so a slow service cannot delay a stop.
"""
