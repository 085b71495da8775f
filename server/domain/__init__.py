"""The domain core: the model, domain errors, the clock, and the inventory operations, written
as SQL against the `Executor` protocol. Imports nothing of the service, and no driver."""
