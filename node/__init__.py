"""The PinkyBrain node service. Layers point one way: api -> services -> core."""
