"""Protocol and state logic with no sockets: identity, config, secrets, request auth, resource guard."""
