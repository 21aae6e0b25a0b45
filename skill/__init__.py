"""The PinkyBrain skill: a light client that finds a node and drives it over signed HTTP.

Never imports node code: everything goes through the node's HTTP API.
"""
