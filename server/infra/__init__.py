"""Plumbing every layer and process may use: settings, metrics, logs, the Redis client and
key names, the background drainer. Imports nothing of the service."""
