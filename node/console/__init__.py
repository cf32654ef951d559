"""The operator console: web pages, REST API, health and metrics, served by the node (FastAPI).

It sits on top of everything else (nothing below imports it) and only reads the index through
the same stores the node uses (JobStore for jobs), so the pages show exactly what the node does.
"""
