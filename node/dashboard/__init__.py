"""The owner's dashboard: a browser view of the node, served by the node itself, to its owner alone.

`sessions` holds the pure logic (one-time login tokens, cookie sessions, CSRF), `events` keeps the recent
operational log lines for the events panel, `routes` is the HTTP side, `static/` the page (plain ES
modules, no build step, nothing fetched from elsewhere).
"""
